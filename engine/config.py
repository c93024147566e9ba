"""How the engine is set up: its limits and the KV cache's size."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EngineConfig:
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: on CUDA the free memory after a warm-up, else 1 GiB
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    # Full-attention blocks, overriding the memory budget (tests and tuning).
    num_kv_blocks: int | None = None
    # Per-request LoRA adapters (EngineCore.load_lora): how many may be loaded at once (0: none, and the model
    # keeps no room for them) and the highest rank they may have (the width of the model's adapter stacks).
    max_loras: int = 0
    max_lora_rank: int = 16
    # Whether the adapters may also target the experts (PEFT's target_parameters): their stacks take about
    # fifteen times the attention's memory, so they are kept only when asked for.
    lora_experts: bool = False
    # Sampling on the device without host syncs (engine.device_sampler) for steps whose requests it serves;
    # None: on CUDA only. The CPU keeps the host sampler (the same tokens as ever for a seed).
    device_sampling: bool | None = None
    # Decode steps through persistent fixed-shape buffers (engine.graphs), replayed as one CUDA graph per
    # batch-size bucket on CUDA and run eagerly elsewhere; needs the Triton kernels. Off until checked on a
    # GPU.
    cuda_graphs: bool = False
    # The overlapped loop (engine.core): the next step is launched before the host handles this one's
    # tokens, for steps the device sampler serves; None: on CUDA where the device sampler is on (on a CPU
    # there is no device to keep busy; the server's --async-scheduling auto passes None only with the Triton
    # kernels). On needs the device sampler (device_sampling None turns it on).
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.block_size < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and block_size must be positive")
        if self.max_loras < 0 or self.max_lora_rank < 1:
            raise ValueError("max_loras must be >= 0 and max_lora_rank positive")
