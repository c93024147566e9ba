"""The model's compute kernels, each fast path beside its plain reference twin (compared in tests only).

* :mod:`model.kernels.attention` — store into the KV cache and attend, with sinks and a sliding window.
* :mod:`model.kernels.experts` — the MoE experts and their MXFP4 weight storage.
* :mod:`model.kernels.cpu_mxfp4` — the CPU experts' fused MXFP4 matmul and the bf16 GEMV (C++, built at
  first use).
* :mod:`model.kernels.cpu_fused` — the rest of a CPU decode layer in a few calls of the same build, and the
  paged attention of its decode steps.
* :mod:`model.kernels.mxfp4` — MXFP4 (de)quantization.
* :mod:`model.kernels.prepacked` — the oneDNN prepacked linear for bf16 weights on the CPU.
* :mod:`model.kernels.triton_attention`, :mod:`model.kernels.triton_moe` — a GPU's kernels in Triton (paged
  attention through the block tables for every step; the MoE on MXFP4 decoded in registers, for decode and
  prompts), loaded on demand.
* :mod:`model.kernels.triton_fused` — the rest of a decode layer in Triton, three launches (norm, QKV, RoPE
  and, on decode steps, the K/V store; output projection and residual; norm and routing) around the
  attention's one and the experts' two (the second adding the residual): six per decode layer. Loaded on
  demand.
* :mod:`model.kernels.fused_reference` — the fused layers' plain twins.
* :mod:`model.kernels.token_bitmask` — grammar masks applied to logits after the model (a C++ loop on the
  host, built at first use; torch ops on a device), for the engine's constrained decoding.

:class:`Kernels` names the implementations a model runs: :meth:`Kernels.for_device` the fast paths of a
device, :meth:`Kernels.triton` the Triton path, :data:`REFERENCE` the twins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from model.kernels import cpu_mxfp4
from model.kernels.attention import (
    HAS_CPU_FLASH_LSE,
    Attention,
    TorchAttention,
    attention_reference,
    sdpa_sink_as_key,
    sdpa_sink_from_lse,
)
from model.kernels.cpu_fused import CpuAttention, CpuFusedLayers
from model.kernels.experts import (
    Experts,
    ExpertWeights,
    experts_batched,
    experts_fused,
    experts_grouped,
    experts_reference,
)

if TYPE_CHECKING:
    from torch import nn

    from model.batch import AttentionMetadata, KVCache


class NormWeights(Protocol):
    """An RMS norm's parameters."""

    scale: torch.Tensor
    eps: float


class AttentionWeights(Protocol):
    """What a fused attention reads of an attention block (:class:`~model.gpt_oss.AttentionBlock` is one):
    described here so the kernels depend on these names, not on the model file that uses the kernels."""

    layer: int
    heads: int
    kv_heads: int
    head_dim: int
    window: int
    scale: float
    norm: NormWeights
    qkv: nn.Linear
    out: nn.Linear
    sinks: torch.Tensor
    attention: Attention


class RouterWeights(Protocol):
    """What a fused router reads of an MLP block (:class:`~model.gpt_oss.MLPBlock` is one)."""

    top_k: int
    norm: NormWeights
    gate: nn.Linear


class MLPWeights(RouterWeights, ExpertWeights, Protocol):
    """What a fused MLP block reads of an MLP block (:class:`~model.gpt_oss.MLPBlock` is one): the router's
    and the experts' weights, and the experts implementation the block was built with."""

    experts: Experts


class FusedLayers(Protocol):
    """Fused replacements of a block's small ops for the steps they apply to (few rows: decode steps, short
    prompt chunks). A block asks :meth:`applies` first and otherwise runs its own forward, the spec the
    fused path matches."""

    def applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether a step of activations `x` runs fused on the block's `weight`."""
        ...

    def attention(
        self,
        block: AttentionWeights,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """The attention block's output (the residual stream after it), without adapters."""
        ...

    def mlp(self, block: MLPWeights, x: torch.Tensor, lora: torch.Tensor | None) -> torch.Tensor:
        """The MLP block's output (the residual stream after it): its norm and routing fused, its experts
        (with `lora`, each token's adapter slot) as the block's own."""
        ...


@dataclass(frozen=True, slots=True)
class Kernels:
    """The implementations a :class:`~model.gpt_oss.GptOss` is built with: attention, experts and, where a
    device has them, fused layers (None: every block runs its plain forward)."""

    attention: Attention
    experts: Experts
    fused: FusedLayers | None = None

    def reads_paired_rows(self, dtype: torch.dtype) -> bool:
        """Whether these kernels read a model's packed experts fastest in row pairs
        (:meth:`~model.kernels.experts.MXFP4Weight.pair_rows`), and read nothing else: the fused CPU experts
        on bfloat16 activations that the kernel multiplies natively."""
        return self.experts is experts_fused and dtype == torch.bfloat16 and cpu_mxfp4.native_bf16()

    @classmethod
    def for_device(cls, device: torch.device | str) -> Kernels:
        """The fast paths for `device`. The CPU: experts grouped by expert (no padding), multiplied from their
        packed bytes by the fused MXFP4 kernel where it builds (else dequantized per step, with a warning:
        :func:`model.kernels.cpu_mxfp4.available`), and the sinks from the fused attention kernel's
        log-sum-exp (no copy of the keys); where the kernels are built for AVX512-BF16, bfloat16 decode steps
        also take the fused decode layer and the paged attention of :mod:`model.kernels.cpu_fused`.
        Elsewhere: experts in batched matmuls (few launches) and the sinks as an extra key (any fused
        kernel)."""
        if torch.device(device).type == "cpu":
            attention = TorchAttention(sdpa_sink_from_lse if HAS_CPU_FLASH_LSE else sdpa_sink_as_key)
            if cpu_mxfp4.native_bf16():
                return cls(CpuAttention(attention), experts_fused, CpuFusedLayers())
            return cls(attention, experts_fused if cpu_mxfp4.available() else experts_grouped)
        return cls(TorchAttention(sdpa_sink_as_key), experts_batched)

    @classmethod
    def triton(cls, *, fused: bool = True) -> Kernels:
        """The attention and the packed experts of every step through the Triton kernels
        (:mod:`model.kernels.triton_attention`, :mod:`model.kernels.triton_moe`), with `fused` the rest of
        each decode layer too (:mod:`model.kernels.triton_fused`), everything else through the GPU's torch
        paths. Imported here, on demand: CPU inference never needs Triton."""
        from model.kernels.triton_attention import TritonAttention
        from model.kernels.triton_fused import TritonFusedLayers
        from model.kernels.triton_moe import experts_triton

        return cls(
            TritonAttention(TorchAttention(sdpa_sink_as_key)),
            experts_triton,
            TritonFusedLayers() if fused else None,
        )


REFERENCE = Kernels(attention_reference, experts_reference)
