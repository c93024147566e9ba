"""The CPU's fused decode layer: a few compiled calls per block where the model's plain forward runs some
sixty torch operators.

At batch 1 on the CPU a decode step reads about 3.7 GB of weights for the whole 20b, which the GEMV and the
MXFP4 kernel stream near the memory's speed; what is left of a layer is small operators (norms, RoPE, the
cache's store and gather, the attention's padding and sink, routing, SwiGLU, residuals), each dispatched from
Python for a few microseconds of work, which over 24 layers added up to a large share of the step
(benchmarks/README.md). Here each part of a block is one call into the C++ of ``cpu_decode.cpp`` (built with
:mod:`model.kernels.cpu_mxfp4`, whose GEMV and expert rows it reuses):

* :func:`norm_qkv_rope`, :func:`out_residual`, :func:`route`: the attention's norm, projection and rotation;
  its output projection and residual; the MLP's norm and routing (the block's experts and residual add then
  run as its forward runs them). Twins in
  :mod:`model.kernels.fused_reference`, shared with the GPU's fused layer.
* :func:`paged_attention`: the store into the cache and the attention over the blocks where they lie, with
  sinks and the sliding window; twin :func:`model.kernels.attention.attention_reference`.
  :class:`CpuAttention` takes it for steps of up to :data:`MAX_TOKENS` rows at the model's attention seam.

:class:`CpuFusedLayers` is the :class:`~model.kernels.FusedLayers` seam's implementation, the attention block
in three calls and the router in one, for steps of up to :data:`MAX_TOKENS` rows of bfloat16 on plain
weights, where the GEMV runs them (:func:`model.kernels.cpu_mxfp4.gemv_applies`). A batch-1 step's experts are
one call too (:func:`model.kernels.experts.experts_fused`). The results round where the plain forward rounds,
so they differ from it only in the order of a few float32 sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from model.batch import AttentionMetadata, KVCache, LayerKV
from model.kernels import cpu_mxfp4
from model.kernels.attention import Attention, fused_attention
from model.kernels.cpu_mxfp4 import GEMV_MAX_ROWS

if TYPE_CHECKING:
    from model.kernels import AttentionWeights, MLPWeights

# Rows a step may have for the fused calls: as many as the GEMV takes.
MAX_TOKENS = GEMV_MAX_ROWS


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a step of activations `x` runs the fused calls on the block's `weight`: bfloat16 rows, at
    most :data:`MAX_TOKENS` of them, on a plain weight the GEMV takes, with the kernels built for this CPU."""
    return x.shape[0] > 0 and cpu_mxfp4.gemv_applies(x, weight)


def _module() -> object:
    if not cpu_mxfp4.native_bf16():
        raise RuntimeError("the CPU's fused decode layer needs the kernels built with AVX512-BF16")
    return cpu_mxfp4.module()


def _check_rows(x: torch.Tensor) -> None:
    if not 0 < x.shape[0] <= MAX_TOKENS:
        raise ValueError(f"the fused CPU decode calls take 1 to {MAX_TOKENS} rows, got {x.shape[0]}")


def norm_qkv_rope(
    x: torch.Tensor,
    norm_scale: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q `[T, heads, D]`, k and v `[T, kv_heads, D]`, bfloat16: ``RMSNorm(x) @ weight.T + bias`` rounded,
    split, and q and k rotated by `cos`/`sin` `[T, D/2]` (float32) and rounded again, as the plain attention
    block does. Views of one `[T, (heads + 2 kv_heads) D]` tensor. `x [T, H]`, T up to :data:`MAX_TOKENS`."""
    _check_rows(x)
    q, k, v = _module().norm_qkv_rope(  # type: ignore[attr-defined]
        x.contiguous(),
        norm_scale.contiguous(),
        eps,
        weight,
        bias,
        cos.float().contiguous(),
        sin.float().contiguous(),
        heads,
        kv_heads,
    )
    return q, k, v


def out_residual(
    a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor:
    """``x + (a @ weight.T + bias)``, bfloat16, the product rounded before the sum as the plain block rounds
    it. `a [T, K]`, `weight [N, K]`, `x [T, N]`, T up to :data:`MAX_TOKENS`."""
    _check_rows(x)
    return _module().out_residual(a.contiguous(), weight, bias, x.contiguous())  # type: ignore[attr-defined]


def route(
    x: torch.Tensor,
    norm_scale: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, indices, weights): ``t = RMSNorm(x)`` `[T, H]`, each token's `top_k` experts by router logit
    (rounded to bfloat16 first, as the plain router's are; highest first, ties to the lower expert) `[T,
    top_k]` int64, and the softmax over those logits `[T, top_k]`, bfloat16."""
    _check_rows(x)
    t, indices, weights = _module().norm_route(  # type: ignore[attr-defined]
        x.contiguous(), norm_scale.contiguous(), eps, weight, bias, top_k
    )
    return t, indices, weights


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    kv: LayerKV,
    sinks: torch.Tensor,
    scale: float,
    window: int,
) -> torch.Tensor:
    """The :class:`~model.kernels.attention.Attention` contract over a cache: the new `k`, `v` stored at
    ``kv.tables.slot_mapping``, then each token's attention `[T, heads · D]` over the slots its sequence's
    tables list, reading the blocks where they lie. bfloat16, T up to :data:`MAX_TOKENS`, head_dim a multiple
    of 32 up to 128."""
    _check_rows(q)
    tables = kv.tables
    return _module().paged_attention(  # type: ignore[attr-defined]
        q,
        k,
        v,
        kv.k,
        kv.v,
        tables.slot_mapping,
        tables.block_index,
        tables.key_positions,
        meta.seq_index,
        meta.positions,
        tables.block_size,
        window,
        sinks,
        scale,
    )


def attention_applies(q: torch.Tensor, kv: LayerKV | None) -> bool:
    """Whether :func:`paged_attention` takes a step: a cache, bfloat16 queries and cache, at most
    :data:`MAX_TOKENS` rows, a head_dim it handles, the kernels built for this CPU."""
    return (
        kv is not None
        and 0 < q.shape[0] <= MAX_TOKENS
        and q.dtype == kv.k.dtype == torch.bfloat16
        and q.device.type == "cpu"
        and q.shape[-1] % 32 == 0
        and q.shape[-1] <= 128
        and kv.k.is_contiguous()
        and kv.v.is_contiguous()
        and cpu_mxfp4.native_bf16()
    )


@dataclass(frozen=True, slots=True)
class CpuAttention:
    """The CPU's attention seam: :func:`paged_attention` for the steps it takes (:func:`attention_applies`:
    decode steps and short chunks over a cache), `fallback` (the torch path) for the rest."""

    fallback: Attention

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        kv: LayerKV | None,
        sinks: torch.Tensor,
        scale: float,
        window: int,
    ) -> torch.Tensor:
        if kv is not None and attention_applies(q, kv):
            return paged_attention(q, k, v, meta, kv, sinks, scale, window)
        return self.fallback(q, k, v, meta, kv, sinks, scale, window)


class CpuFusedLayers:
    """The fused decode layer of the CPU (:meth:`Kernels.for_device <model.kernels.Kernels.for_device>`): an
    attention block in three calls around the attention seam, an MLP block's norm and routing in one. A block
    runs it for steps :func:`applies` to, else its own forward, the spec these are tested against."""

    max_tokens = MAX_TOKENS

    def applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return applies(x, weight)

    def attention(
        self,
        block: AttentionWeights,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """``block(x, cos_sin, meta, cache)`` without adapters: the residual stream after the attention."""
        return fused_attention(block, x, cos_sin, meta, cache, norm_qkv_rope, out_residual)

    def mlp(self, block: MLPWeights, x: torch.Tensor, lora: torch.Tensor | None) -> torch.Tensor:
        """``block(x, lora)``: the norm and routing in one call (:func:`route`), then the block's experts and
        the residual add as its forward runs them."""
        t, indices, weights = route(
            x, block.norm.scale, block.norm.eps, block.gate.weight, block.gate.bias, block.top_k
        )
        return x + block.experts(block, t, indices, weights, lora)
