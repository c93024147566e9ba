"""The gpt-oss transformer, in reading order: RMSNorm, YaRN RoPE, attention with sinks and a sliding window,
the mixture of experts, the blocks, the model and its loading.

Module names equal the `original/` checkpoint keys (``block.N.attn.qkv``, ``block.N.mlp.mlp1_weight.blocks``),
so loading is a rename-free assignment.

A forward runs the flattened tokens of several sequences, described by an
:class:`~model.batch.AttentionMetadata`, against a KV cache (:class:`~model.batch.KVCache`; see
:mod:`model.batch`). The model is built with its compute injected: an attention implementation that stores
the new keys and values into the cache and attends, an experts implementation and, optionally, fused layers
that a block runs instead of its own small ops on the steps they take (few rows: decode steps on a GPU)
(:mod:`model.kernels`); the blocks' plain forwards stay the spec. :meth:`GptOss.from_checkpoint` picks the
fast paths for the device; :data:`model.kernels.REFERENCE` builds the same model on the plain reference
twins, for tests.

On the CPU, bf16 matrices are laid out once at load for the CPU's matmuls (:mod:`model.kernels.prepacked`):
dequantized experts reordered into oneDNN's blocked layout; the linears likewise, or, where the bf16 GEMV is
built (AVX512-BF16), kept plain on huge pages for it (:func:`model.kernels.prepacked.for_decode`). Every
matmul goes through :func:`model.kernels.prepacked.linear`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from model import host_memory
from model.batch import AttentionMetadata, BlockTables, KVCache, LayerKV
from model.config import ModelConfig
from model.kernels import FusedLayers, Kernels, prepacked
from model.kernels.attention import Attention
from model.kernels.experts import ExpertMode, Experts, MXFP4Weight
from model.lora import ExpertLoraStack, LoraStack, Update, check_unmerged, part_rows, read_adapter
from model.weights import open_checkpoint

logger = logging.getLogger(__name__)


def lora_stack_nbytes(
    config: ModelConfig, max_loras: int, max_rank: int, *, experts: bool, dtype: torch.dtype
) -> int:
    """Bytes the per-request adapter stacks of :meth:`GptOss.enable_lora` take."""
    c = config
    qkv = 3 * max_rank * (c.hidden_size + c.qkv_size)  # q, k and v each get max_rank columns
    out = max_rank * (c.q_size + c.hidden_size)
    per_layer = qkv + out
    if experts:
        h, i = c.hidden_size, c.intermediate_size
        per_layer += c.num_experts * max_rank * ((h + 2 * i) + (i + h))
    element = torch.empty(0, dtype=dtype).element_size()
    return max_loras * per_layer * c.num_hidden_layers * element


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` (CUDA: the driver's count; the CPU: Linux's MemAvailable); None: unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


class Linear(nn.Linear):
    """``nn.Linear`` whose weight may be prepacked for the CPU (:func:`GptOss.prepack_weights`)."""

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return prepacked.linear(x, self.weight, self.bias, out)


class RMSNorm(nn.Module):
    """Scale-only RMSNorm, computed in float32 whatever the activation dtype."""

    def __init__(self, num_features: int, eps: float, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(num_features, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.float()
        t = t * torch.rsqrt(t.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (t * self.scale).to(x.dtype)


def rope_parameters(config: ModelConfig) -> tuple[float, torch.Tensor]:
    """YaRN (arXiv 2309.00071): the attention concentration and per-pair inverse frequencies.

    Pairs rotating slower than `ntk_beta` turns over the original context are interpolated by the scaling
    factor, those faster than `ntk_alpha` turns are kept, with a linear ramp between (NTK-by-parts).
    """
    half = config.head_dim // 2
    freq = config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim)
    if config.rope_scaling_factor <= 1.0:
        return 1.0, 1.0 / freq
    concentration = 0.1 * math.log(config.rope_scaling_factor) + 1.0
    low, high = (
        half * math.log(config.initial_context_length / (beta * 2 * math.pi)) / math.log(config.rope_theta)
        for beta in (config.rope_ntk_beta, config.rope_ntk_alpha)
    )
    ramp = ((torch.arange(half, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    interpolation = 1.0 / (config.rope_scaling_factor * freq)
    extrapolation = 1.0 / freq
    inv_freq = interpolation * ramp + extrapolation * (1 - ramp)
    return concentration, inv_freq


class RotaryEmbedding(nn.Module):
    """Half-split (non-interleaved) rotation: pair j is (x[j], x[j + head_dim/2])."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        concentration, inv_freq = rope_parameters(config)
        self.concentration = concentration
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return angles.cos() * self.concentration, angles.sin() * self.concentration

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, head_dim]; cos, sin [T, head_dim/2]."""
        t = x.float()
        x1, x2 = t.chunk(2, dim=-1)
        cos, sin = cos[:, None, :], sin[:, None, :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class AttentionBlock(nn.Module):
    """Grouped-query attention through the KV cache, with a learned sink per head and, on the layers the
    config says, a sliding window; RoPE on the queries and keys."""

    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        attention: Attention,
        device: torch.device | str | None = None,
        fused: FusedLayers | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.window = config.window(layer)
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device)
        self.qkv = Linear(config.hidden_size, config.qkv_size, device=device)
        self.sinks = nn.Parameter(torch.zeros(config.num_attention_heads, device=device))
        self.out = Linear(config.q_size, config.hidden_size, device=device)
        self.attention = attention
        self.fused = fused
        # Per-request LoRA adapters of `qkv` and `out` (GptOss.enable_lora); None when none are served.
        self.qkv_lora: LoraStack | None = None
        self.out_lora: LoraStack | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cache: KVCache | None,
        lora: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.fused is not None and lora is None and self.fused.applies(x, self.qkv.weight):
            return self.fused.attention(self, x, cos_sin, meta, cache)  # the same, in fewer launches
        t = self.norm(x)
        qkv = self.qkv(t)
        if lora is not None:
            qkv = qkv + self._lora(self.qkv_lora, t, lora)
        q, k, v = qkv.split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1
        )
        q = RotaryEmbedding.rotate(q.unflatten(-1, (self.heads, self.head_dim)), *cos_sin)
        k = RotaryEmbedding.rotate(k.unflatten(-1, (self.kv_heads, self.head_dim)), *cos_sin)
        v = v.unflatten(-1, (self.kv_heads, self.head_dim))
        kv = None if cache is None else cache.layer(self.layer, self.window, meta)
        t = self.attention(q, k, v, meta, kv, self.sinks, self.scale, self.window)
        out = self.out(t)
        if lora is not None:
            out = out + self._lora(self.out_lora, t, lora)
        return x + out

    @staticmethod
    def _lora(stack: LoraStack | None, t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Each token's adapter update of a projection of `t` (`slots [T]`: its adapter, 0 for none)."""
        assert stack is not None, "per-request adapters need GptOss.enable_lora"
        return stack(t, slots)


class MLPBlock(nn.Module):
    """The mixture of experts: each token goes to its top-k experts by router logit, weighted by a softmax
    over those k logits; an expert is ``mlp2(swiglu(mlp1(t)))`` with MXFP4 weights
    (:mod:`model.kernels.experts`)."""

    def __init__(
        self,
        config: ModelConfig,
        experts: Experts,
        device: torch.device | str | None = None,
        fused: FusedLayers | None = None,
    ) -> None:
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
        self.top_k = config.experts_per_token
        self.swiglu_alpha, self.swiglu_limit = config.swiglu_alpha, config.swiglu_limit
        self.norm = RMSNorm(h, config.rms_norm_eps, device)
        self.gate = Linear(h, e, device=device)
        self.mlp1_weight = MXFP4Weight(e, 2 * i, h, device)
        self.mlp1_bias = nn.Parameter(torch.zeros(e, 2 * i, device=device))
        self.mlp2_weight = MXFP4Weight(e, h, i, device)
        self.mlp2_bias = nn.Parameter(torch.zeros(e, h, device=device))
        self.experts = experts
        self.fused = fused
        # Per-request LoRA adapters of the experts (GptOss.enable_lora with experts); None: none served.
        self.mlp1_lora: ExpertLoraStack | None = None
        self.mlp2_lora: ExpertLoraStack | None = None

    def route(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts per token and their weights: a softmax over the selected router logits only."""
        top = torch.topk(self.gate(t), k=self.top_k, dim=-1, sorted=True)
        return top.indices, torch.softmax(top.values.float(), dim=-1).to(t.dtype)

    def forward(self, x: torch.Tensor, lora: torch.Tensor | None = None) -> torch.Tensor:
        if self.fused is not None and self.fused.applies(x, self.gate.weight):
            return self.fused.mlp(self, x, lora)  # the same, in fewer launches
        t = self.norm(x)
        indices, weights = self.route(t)
        return x + self.experts(self, t, indices, weights, lora)


class TransformerBlock(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        attention: Attention,
        experts: Experts,
        device: torch.device | str | None = None,
        fused: FusedLayers | None = None,
    ) -> None:
        super().__init__()
        self.attn = AttentionBlock(config, layer, attention, device, fused)
        self.mlp = MLPBlock(config, experts, device, fused)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cache: KVCache | None,
        lora: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.mlp(self.attn(x, cos_sin, meta, cache, lora), lora)


class GptOss(nn.Module):
    """The whole model. Build it with :meth:`from_checkpoint`; run it under ``torch.inference_mode()``."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        attention: Attention,
        experts: Experts,
        fused: FusedLayers | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size, device=device)
        self.block = nn.ModuleList(
            TransformerBlock(config, n, attention, experts, device, fused)
            for n in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device)
        self.unembedding = Linear(config.hidden_size, config.vocab_size, bias=False, device=device)
        self.rope = RotaryEmbedding(config, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def forward(
        self,
        token_ids: torch.Tensor,
        meta: AttentionMetadata,
        cache: KVCache | None = None,
        logits_indices: torch.Tensor | None = None,
        logits_out: torch.Tensor | None = None,
        lora: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[T, vocab]` (float32) for the flattened tokens `token_ids [T]`, or only for the rows
        `logits_indices` (e.g. each sequence's last token).

        With `logits_out` (float32 `[R, vocab]`, R at least the rows computed) they are written into its
        leading rows and that view is returned. A caller that runs step after step keeps one buffer that
        way: a fresh `[64, 201088]` float32 result is 51 MB, which glibc maps anew for every call (it is over
        its mmap threshold), and the CPU then takes a page fault per 4 KB written.

        `lora [T]`, each token's adapter slot (0: none; see :meth:`enable_lora`), applies per-request
        adapters; None when no token has one.
        """
        x = self.hidden(token_ids, meta, cache, lora)
        if logits_indices is not None:
            x = x[logits_indices]
        return self.logits(x, logits_out)

    def hidden(
        self,
        token_ids: torch.Tensor,
        meta: AttentionMetadata,
        cache: KVCache | None = None,
        lora: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last block's output `[T, hidden]` for every token, before the final norm: the part of
        :meth:`forward` that fills the cache, for a caller that unembeds chosen rows itself."""
        x = self.embedding(token_ids)
        cos_sin = self.rope.cos_sin(meta.positions)
        for block in self.block:
            x = block(x, cos_sin, meta, cache, lora)
        return x

    def logits(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits `[R, vocab]` of hidden rows `x [R, hidden]` (final norm, then unembedding), written
        into the leading rows of `out` when given (see :meth:`forward`)."""
        x = self.norm(x)
        if out is None:
            return self.unembedding(x).float()
        assert out.dtype == torch.float32
        return self.unembedding(x, out=out[: x.shape[0]])

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        expert_mode: ExpertMode | str = ExpertMode.PACKED,
        prepack: bool = True,
        progress: bool = True,
        kernels: Kernels | None = None,
        quantize: bool = False,
        lora: str | Path | None = None,
    ) -> GptOss:
        """Load a checkpoint directory of either layout straight onto `device`.

        Weights other than the experts take `dtype`; norms and sinks stay float32 (they are tiny and used in
        float32); expert blocks and scales stay packed uint8 unless `expert_mode` is ``"dequantized"``. A
        fine-tune's plain experts are served as they are (in `dtype`), or with `quantize` rounded to MXFP4 at
        load and served packed. `lora`, a PEFT adapter directory, is merged into the weights (experts it
        adapts then follow the same rule: dense, or rounded back to MXFP4 with `quantize`). With
        `prepack` the bf16 matrices are reordered for the CPU where :func:`model.kernels.prepacked.applies` (a
        no-op elsewhere); without it they stay plain, which is the reference the fast path is tested against.
        The code that computes with the weights comes with `kernels` (the attention and experts
        implementations, and fused layers where it has them), by default the fast paths for `device`
        (:meth:`Kernels.for_device`).
        """
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        device = torch.device(device)
        expert_mode = ExpertMode(expert_mode)
        started = time.perf_counter()
        reader = open_checkpoint(path)
        kernels = Kernels.for_device(device) if kernels is None else kernels
        with torch.device("meta"):
            model = cls(
                reader.files.config, attention=kernels.attention, experts=kernels.experts, fused=kernels.fused
            )
        model.assign_weights(reader.items(device, progress=progress), dtype=dtype, quantize=quantize)
        if lora is not None:
            model.merge_lora(read_adapter(lora, model.config), dtype=dtype, quantize=quantize)
        if prepack:  # first: while the experts are still packed, a linear's transient copy costs least
            model.prepack_weights()
        paired = prepack and kernels.reads_paired_rows(dtype)
        for block in model.block:
            for weight in (block.mlp.mlp1_weight, block.mlp.mlp2_weight):
                if weight.dense is not None and prepack:  # a fine-tune's plain experts, kept plain
                    weight.prepack_dense()
                elif weight.dense is None and expert_mode is ExpertMode.DEQUANTIZED:
                    weight.dequantize_all(dtype, prepack)
                elif weight.dense is None and prepack:  # streamed by the fused kernel at every decode step
                    if paired:
                        weight.pair_rows()
                    weight.blocks = host_memory.on_huge_pages(weight.blocks)
                    weight.scales = host_memory.on_huge_pages(weight.scales)
        model.rope = RotaryEmbedding(model.config, device)
        model.eval().requires_grad_(False)
        logger.info(
            "loaded %s (%s layout, %.2f GB on disk) to %s %s with %s experts%s in %.1f s",
            path,
            reader.layout.value,
            reader.nbytes / 1e9,
            device,
            dtype,
            "plain" if model.block[0].mlp.mlp1_weight.blocks.numel() == 0 else expert_mode.value,
            ", linears prepacked for oneDNN" if model.unembedding.weight.is_mkldnn else "",
            time.perf_counter() - started,
        )
        return model

    def assign_weights(
        self, tensors: Iterable[tuple[str, torch.Tensor]], *, dtype: torch.dtype, quantize: bool = False
    ) -> None:
        """Take every weight, by its module name, from `tensors` (a checkpoint's, or random ones drawn on the
        device for benchmarks): packed experts stay uint8, norms and sinks float32, the rest `dtype`; a
        fine-tune's plain experts (``*.dense``) go to their :class:`MXFP4Weight`, rounded to MXFP4 with
        `quantize`."""
        for name, tensor in tensors:
            module_name, attr = name.rsplit(".", 1)
            module = self.get_submodule(module_name)
            if attr == "dense":
                assert isinstance(module, MXFP4Weight)
                module.load_plain(tensor if quantize else tensor.to(dtype), quantize=quantize)
                continue
            if tensor.dtype != torch.uint8:
                keep_fp32 = name.endswith((".scale", "sinks"))
                tensor = tensor.to(torch.float32 if keep_fp32 else dtype)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
            else:
                module._buffers[attr] = tensor
        missed = [n for n, t in self.state_dict().items() if t.is_meta]
        assert not missed, f"not loaded: {missed}"

    def merge_lora(self, updates: list[Update], *, dtype: torch.dtype, quantize: bool = False) -> None:
        """Add LoRA updates (:func:`model.lora.read_adapter`) to the weights in float32, before a prepack."""
        for update in updates:
            module_name, attr = update.name.rsplit(".", 1)
            module = self.get_submodule(module_name)
            delta = update.delta()
            if isinstance(getattr(module, attr), MXFP4Weight):
                getattr(module, attr).add_update(delta, dtype, quantize=quantize)
                continue
            weight = getattr(module, attr)
            assert not weight.is_mkldnn, "LoRA is merged before the weights are prepacked"
            rows = update.rows or slice(None)
            merged = weight.data[rows].float() + delta.to(weight.device)
            weight.data[rows] = merged.to(weight.dtype)

    def enable_lora(self, max_loras: int, max_rank: int, *, experts: bool = False) -> None:
        """Make room for `max_loras` per-request adapters of rank up to `max_rank`, in slots 1 .. max_loras
        (:meth:`set_lora`), on every block's ``qkv`` and ``out``, and with `experts` on its experts' ``mlp1``
        and ``mlp2`` too; a forward's `lora` picks each token's.

        Raises ValueError, before allocating anything, when the stacks would not fit in the device's free
        memory (they grow with `max_loras` × `max_rank`, the experts' about fifteen times the attention's)."""
        assert max_loras > 0
        assert max_rank > 0
        needed = lora_stack_nbytes(self.config, max_loras, max_rank, experts=experts, dtype=self.dtype)
        free = free_memory(self.device)
        if free is not None and needed > free:
            raise ValueError(
                f"the LoRA adapter stacks for {max_loras} adapters of rank up to {max_rank}"
                f"{' on attention and experts' if experts else ''} need {needed / 2**30:.1f} GiB, and the "
                f"{self.device.type} has {free / 2**30:.1f} GiB free: lower --max-loras or --max-lora-rank"
                f"{' (or leave out --lora-experts)' if experts else ''}"
            )
        self.max_loras, self.max_lora_rank, self.lora_experts = max_loras, max_rank, experts
        c, dtype, device = self.config, self.dtype, self.device
        for block in self.block:
            attn = block.attn
            qkv_parts, out_parts = part_rows(c, "attn.qkv.weight"), part_rows(c, "attn.out.weight")
            attn.qkv_lora = LoraStack(
                max_loras, max_rank, c.hidden_size, qkv_parts, dtype=dtype, device=device
            )
            attn.out_lora = LoraStack(max_loras, max_rank, c.q_size, out_parts, dtype=dtype, device=device)
            if experts:
                e, h, i = c.num_experts, c.hidden_size, c.intermediate_size
                block.mlp.mlp1_lora = ExpertLoraStack(
                    e, max_loras, max_rank, h, 2 * i, dtype=dtype, device=device
                )
                block.mlp.mlp2_lora = ExpertLoraStack(
                    e, max_loras, max_rank, i, h, dtype=dtype, device=device
                )

    def set_lora(self, slot: int, updates: list[Update]) -> None:
        """Serve the adapter `updates` (:func:`model.lora.read_adapter`) in `slot`, replacing what it held.

        Raises :class:`model.lora.AdapterError` for an adapter the stacks cannot hold (too high a rank, the
        experts without room for them) before anything changes."""
        assert 1 <= slot <= self.max_loras, f"slot {slot} of {self.max_loras}"
        check_unmerged(updates, self.max_lora_rank, self.lora_experts)
        self.clear_lora(slot)
        for update in updates:
            if update.on_experts:  # block.N.mlp.mlp1_weight or mlp2_weight
                mlp_name, _, weight = update.name.rpartition(".")
                mlp = self.get_submodule(mlp_name)
                experts = mlp.mlp1_lora if weight == "mlp1_weight" else mlp.mlp2_lora
                assert experts is not None, "checked by check_unmerged"
                experts.install(slot, update)
                continue
            prefix, _, name = update.name.partition(".attn.")
            attn = self.get_submodule(prefix).attn
            stack = attn.qkv_lora if name == "qkv.weight" else attn.out_lora
            assert stack is not None
            stack.install(slot, update)

    def clear_lora(self, slot: int) -> None:
        """Empty `slot`: its tokens then get the base model."""
        for block in self.block:
            for stack in (block.attn.qkv_lora, block.attn.out_lora):
                assert stack is not None, "per-request adapters need enable_lora"
                stack.clear(slot)
            for experts in (block.mlp.mlp1_lora, block.mlp.mlp2_lora):
                if experts is not None:
                    experts.clear(slot)

    def use_kernels(self, kernels: Kernels) -> None:
        """Compute with other implementations from now on, on the same weights (benchmarks compare paths);
        experts laid out in row pairs go back to the checkpoint's layout for kernels that read no pairs."""
        for block in self.block:
            block.attn.attention = kernels.attention
            block.mlp.experts = kernels.experts
            block.attn.fused = block.mlp.fused = kernels.fused
            if not kernels.reads_paired_rows(self.dtype):
                block.mlp.mlp1_weight.unpair_rows()
                block.mlp.mlp2_weight.unpair_rows()

    def weight_nbytes(self) -> int:
        """Bytes the weights hold: the state dict plus dequantized experts, which live outside it."""
        held = sum(t.nbytes for t in self.state_dict().values())
        for block in self.block:
            for weight in (block.mlp.mlp1_weight, block.mlp.mlp2_weight):
                held += sum(d.nbytes for d in weight.dense or ())
        return held

    def prepack_weights(self) -> None:
        """Lay out every :class:`Linear` weight for the CPU where :func:`model.kernels.prepacked.applies`
        (:func:`model.kernels.prepacked.for_decode`), and store a float32 unembedding on the CPU transposed
        (:func:`model.kernels.prepacked.column_major`).

        The new weight replaces the plain one (same bytes): a prepacked one is an opaque oneDNN tensor.
        """
        for module in self.modules():
            if isinstance(module, Linear) and prepacked.applies(module.weight):
                module.weight = nn.Parameter(prepacked.for_decode(module.weight.data), requires_grad=False)
        weight = self.unembedding.weight
        if weight.device.type == "cpu" and weight.dtype == torch.float32:
            self.unembedding.weight = nn.Parameter(prepacked.column_major(weight.data), requires_grad=False)


class ContiguousKVCache:
    """One contiguous row of `max_len` positions per sequence slot and layer, without the engine.

    The simple cache for tests, benchmarks and single-request use; the engine's paged cache replaces it. It is
    a paged cache of one-token blocks whose tables never change (sequence slot `r` owns slots ``r · max_len``
    onwards, position `p` in slot ``r · max_len + p``), so it goes through the same attention seam; for a
    sliding-window layer its tables list only the keys the window can reach, so decode reads O(window) there.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_slots: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_slots * max_len, config.num_key_value_heads, config.head_dim)
        self.max_len = max_len
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        # The tables depend only on the metadata and the window: built once per forward, not per layer.
        self._tables: tuple[AttentionMetadata | None, dict[int, BlockTables]] = (None, {})

    def layer(self, layer: int, window: int, meta: AttentionMetadata) -> LayerKV:
        assert meta.cache_slots is not None, "ContiguousKVCache needs AttentionMetadata.cache_slots"
        assert max(meta.context_lens) <= self.max_len, "sequence longer than the cache"
        if self._tables[0] is not meta:
            self._tables = (meta, {})
        tables = self._tables[1]
        if window not in tables:
            device = self.k[layer].device
            rows = torch.tensor(meta.cache_slots, device=device) * self.max_len
            # Oldest key any new query can see: the window of the first new token, or 0 for full attention.
            firsts = [c - q for q, c in zip(meta.query_lens, meta.context_lens, strict=True)]
            starts = [max(0, f - window + 1) if window else 0 for f in firsts]
            width = max(c - s for c, s in zip(meta.context_lens, starts, strict=True))
            index = torch.tensor(starts, device=device)[:, None] + torch.arange(width, device=device)[None, :]
            valid = index < torch.tensor(meta.context_lens, device=device)[:, None]
            tables[window] = BlockTables(
                slot_mapping=rows[meta.seq_index] + meta.positions,
                block_index=rows[:, None] + index.where(valid, 0),
                key_positions=index.where(valid, -1),
                block_size=1,
            )
        return LayerKV(self.k[layer], self.v[layer], tables[window])
