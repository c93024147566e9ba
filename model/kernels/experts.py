"""The experts of the MoE block: the MXFP4 weight storage and three ways to compute the routed sum.

Every implementation takes the block's weights (:class:`ExpertWeights`), the normed tokens ``t [T, H]``, each
token's experts ``indices [T, k]`` and their routing weights ``[T, k]``, and returns
``sum_j weights[n, j] * mlp2_e(swiglu(mlp1_e(t[n])))`` per token, ``e = indices[n, j]``:

* :func:`experts_reference` — token by token, expert by expert, reference dequantization: the spec.
* :func:`experts_grouped` — the CPU path: each active expert dequantized once and applied to all its tokens.
* :func:`experts_batched` — the GPU path: a fixed number of launches, the active experts in batched matmuls.
* :func:`experts_fused` — the CPU path where the fused MXFP4 kernel builds (:mod:`model.kernels.cpu_mxfp4`):
  grouped as :func:`experts_grouped`, each expert's matmuls straight from its packed bytes.

All of them run on a CPU, so all are tested against the reference there.

Each also takes `lora`, every token's per-request adapter slot (:mod:`model.lora`; None: no token's adapter
changes these experts), and adds the block's :class:`~model.lora.ExpertLoraStack` updates of each routed
(token, expert) pair to the expert's matmul outputs, beside the matmul (never inside a kernel): ``mlp1``'s
before the SwiGLU, ``mlp2``'s before the routing weight, as PEFT adds its update to the weight.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

import torch
from torch import nn

from model.kernels import cpu_mxfp4, prepacked
from model.kernels.mxfp4 import dequantize, dequantize_reference, pair_rows, unpair_rows
from model.kernels.mxfp4 import quantize as quantize_mxfp4
from model.lora import ExpertLoraStack, expert_lora_delta_reference


def swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU over interleaved columns: gate = h[..., ::2], up = h[..., 1::2]."""
    gate, up = h[..., ::2], h[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


class ExpertMode(StrEnum):
    PACKED = "packed"  # MXFP4 in memory; each active expert is dequantized when used
    DEQUANTIZED = "dequantized"  # dequantized once at load, prepacked on the CPU (CPU speed for small models)


class MXFP4Weight(nn.Module):
    """The stacked expert weights of one matmul: `blocks [E, out, in/32, 16]` and `scales [E, out, in/32]`.

    On CPUs whose fused kernel multiplies bfloat16 natively, the model lays the blocks out in row pairs at
    load (:meth:`pair_rows`), the layout that kernel reads fastest at decode; every other reader takes them
    in the checkpoint's order through :meth:`natural_blocks`."""

    def __init__(self, experts: int, rows: int, cols: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.register_buffer(
            "blocks", torch.zeros(experts, rows, cols // 32, 16, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "scales", torch.zeros(experts, rows, cols // 32, dtype=torch.uint8, device=device)
        )
        # ExpertMode.DEQUANTIZED: each expert's dense `[out, in]` weight, prepacked where that applies.
        self.dense: list[torch.Tensor] | None = None
        self.paired = False  # `blocks` in model.kernels.mxfp4.pair_rows' layout

    def pair_rows(self) -> None:
        """Lay the packed blocks out in row pairs (:func:`model.kernels.mxfp4.pair_rows`) for the fused CPU
        kernel (:func:`model.kernels.cpu_mxfp4.mxfp4_linear` with `paired`), in place, one expert at a time
        through one expert's scratch (a second copy of the blocks would raise the peak of loading by that
        much); nothing for dense experts or an odd number of rows."""
        if self.paired or self.dense is not None or not self.blocks.numel() or self.blocks.shape[1] % 2:
            return
        scratch = torch.empty_like(self.blocks[0])
        for expert in self.blocks:
            expert.copy_(pair_rows(expert, out=scratch))
        self.paired = True

    def unpair_rows(self) -> None:
        """Back to the checkpoint's layout, for kernels that read it (any but the fused CPU kernel)."""
        if self.paired:
            self.blocks, self.paired = unpair_rows(self.blocks), False

    def natural_blocks(self, index: int | torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """``blocks[index]`` (experts) in the checkpoint's layout, whichever the blocks are stored in."""
        blocks = self.blocks[index]
        return unpair_rows(blocks) if self.paired else blocks

    def dequantize_all(self, dtype: torch.dtype, prepack: bool) -> None:
        """Switch to :attr:`ExpertMode.DEQUANTIZED`: keep dense weights and drop the packed bytes.

        One expert at a time, so that the temporaries stay one expert's size. A prepack copies the expert, so
        the next one is dequantized into the same buffer: a fresh buffer per expert, freed after its prepack,
        left glibc's heap full of expert-sized holes that the model benchmark's peak RSS showed.
        """
        self.dense = []
        scratch = None
        for e in range(self.blocks.shape[0]):
            weight = dequantize(self.natural_blocks(e), self.scales[e], dtype, out=scratch)
            if prepack and prepacked.applies(weight):
                self.dense.append(prepacked.prepack(weight))
                scratch = weight
            else:
                self.dense.append(weight)
        self.blocks = self.blocks.new_empty(0)
        self.scales = self.scales.new_empty(0)
        self.paired = False

    def load_plain(self, weight: torch.Tensor, *, quantize: bool) -> None:
        """Take plain expert weights `[E, out, in]` (a fine-tune's): kept as they are, one dense matrix per
        expert (as :attr:`ExpertMode.DEQUANTIZED`), or with `quantize` rounded to MXFP4 the way the published
        checkpoints are, so a fine-tune keeps the packed model's memory."""
        if quantize:
            blocks, scales = quantize_mxfp4(weight.float())
            self.blocks, self.scales, self.dense, self.paired = blocks, scales, None, False
            return
        self.dense = list(weight.unbind(0))
        self.blocks = torch.empty(0, dtype=torch.uint8, device=weight.device)
        self.scales = torch.empty(0, dtype=torch.uint8, device=weight.device)
        self.paired = False

    def add_update(self, delta: torch.Tensor, dtype: torch.dtype, *, quantize: bool) -> None:
        """Add `delta [E, out, in]` (a merged LoRA update) to every expert's weight. The sum leaves the MXFP4
        grid, so it is kept dense in `dtype`, or with `quantize` rounded back to MXFP4."""
        summed = []
        for e, update in enumerate(delta.unbind(0)):
            if self.dense is not None:
                weight = prepacked.plain(self.dense[e]).float()
            else:
                weight = dequantize(self.natural_blocks(e), self.scales[e], torch.float32)
            summed.append(weight + update.to(weight.device))
        merged = torch.stack(summed)
        self.load_plain(merged if quantize else merged.to(dtype), quantize=quantize)

    def prepack_dense(self) -> None:
        """Reorder dense experts for the CPU where :func:`model.kernels.prepacked.applies`."""
        if self.dense is not None:
            self.dense = [prepacked.prepack(d) if prepacked.applies(d) else d for d in self.dense]

    def expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert `e`'s weight `[out, in]` in `dtype`, for :func:`model.kernels.prepacked.linear`."""
        if self.dense is not None:
            assert self.dense[e].dtype == dtype, "dequantized experts are kept in the model's dtype"
            return self.dense[e]
        return dequantize(self.natural_blocks(e), self.scales[e], dtype)

    def experts(self, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
        """The plain weights `[len(ids), out, in]` of experts `ids` in `dtype`, dequantized in one call."""
        if self.dense is not None:
            return torch.stack([prepacked.plain(self.dense[e]) for e in ids]).to(dtype)
        index = torch.tensor(ids, device=self.blocks.device)
        return dequantize(self.natural_blocks(index), self.scales[index], dtype)

    def expert_reference(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert `e`'s plain weight `[out, in]` in `dtype`."""
        if self.dense is not None:
            return prepacked.plain(self.dense[e]).to(dtype)
        return dequantize_reference(self.natural_blocks(e), self.scales[e], dtype)


class ExpertWeights(Protocol):
    """What the experts read of an MoE block (:class:`model.gpt_oss.MLPBlock`)."""

    mlp1_weight: MXFP4Weight  # [E, 2I, H]: gate and up columns interleaved
    mlp1_bias: torch.Tensor  # [E, 2I]
    mlp2_weight: MXFP4Weight  # [E, H, I]
    mlp2_bias: torch.Tensor  # [E, H]
    swiglu_alpha: float
    swiglu_limit: float
    # Per-request adapters of mlp1 and mlp2 (GptOss.enable_lora with experts); None when none are served.
    mlp1_lora: ExpertLoraStack | None
    mlp2_lora: ExpertLoraStack | None


# The signature every implementation has: (weights, t, indices, routing weights, each token's adapter slot or
# None) -> the routed sum [T, H].
Experts = Callable[
    [ExpertWeights, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor
]


def _used(stack: ExpertLoraStack | None, lora: torch.Tensor | None) -> ExpertLoraStack | None:
    """`stack` if some adapter fills it and the step has per-request adapters, else None (nothing to add)."""
    return stack if lora is not None and stack is not None and stack.filled else None


def experts_reference(
    mlp: ExpertWeights,
    t: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token by token, expert by expert, reference dequantization; each pair's adapter update through
    :func:`model.lora.expert_lora_delta_reference`."""
    out = torch.zeros_like(t)
    for n in range(t.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[n, j])
            h = mlp.mlp1_weight.expert_reference(e, t.dtype) @ t[n] + mlp.mlp1_bias[e]
            h = h + _pair_delta_reference(_used(mlp.mlp1_lora, lora), t[n], e, lora, n)
            h = swiglu(h, mlp.swiglu_alpha, mlp.swiglu_limit)
            y = mlp.mlp2_weight.expert_reference(e, t.dtype) @ h + mlp.mlp2_bias[e]
            y = y + _pair_delta_reference(_used(mlp.mlp2_lora, lora), h, e, lora, n)
            out[n] += weights[n, j] * y
    return out


def _pair_delta_reference(
    stack: ExpertLoraStack | None, x: torch.Tensor, expert: int, lora: torch.Tensor | None, n: int
) -> torch.Tensor | float:
    if stack is None or lora is None:
        return 0.0
    one = torch.tensor([expert], device=x.device)
    return expert_lora_delta_reference(x[None], stack.a, stack.b, one, lora[n : n + 1])[0]


# experts_grouped: the SwiGLU runs over groups of experts whose first-matmul outputs fit in this many bytes,
# so that its passes stay in the cache: one pass over all the pairs of a long prompt leaves it, and costs
# more than a SwiGLU per expert.
MOE_GROUP_BYTES = 256 << 10


def _spans(counts: list[int]) -> list[tuple[int, int, int]]:
    """`(i, lo, hi)` for each nonzero `counts[i]`: the rows `lo:hi` that item `i` holds when the items' rows
    are laid end to end in order."""
    spans, lo = [], 0
    for i, count in enumerate(counts):
        if count:
            spans.append((i, lo, lo + count))
            lo += count
    return spans


def _groups(spans: list[tuple[int, int, int]], rows: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive `spans` (from :func:`_spans`) in groups of at most `rows` rows (a longer span alone)."""
    groups: list[list[tuple[int, int, int]]] = []
    for span in spans:
        if groups and span[2] - groups[-1][0][1] <= rows:
            groups[-1].append(span)
        else:
            groups.append([span])
    return groups


def experts_grouped(
    mlp: ExpertWeights,
    t: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    lora: torch.Tensor | None = None,
    linear: Callable[[torch.Tensor, MXFP4Weight, int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Grouped by expert, for CPUs: each active expert is dequantized once and applied to all its tokens.

    The token-expert pairs are sorted by expert and their inputs gathered once, so each expert reads a
    contiguous slice and writes its matmuls into slices of two shared buffers. The SwiGLU runs once per
    group of experts (:data:`MOE_GROUP_BYTES`), the routing weights and the sum back into tokens once over
    all pairs; the loop itself is only the two matmuls of each active expert, not the fifteen-odd small ops
    of an expert's whole work (``benchmarks/moe_bench.py`` times it against :func:`experts_batched`). Each
    token's terms are added in the order of its experts (the pairs are sorted stably), as the reference
    adds them. `linear(x, weight, e, bias, out)` computes one expert's matmul into `out`; by default the
    expert is dequantized (:meth:`MXFP4Weight.expert`) and run through :func:`model.kernels.prepacked.linear`.
    An expert some of whose rows run with an adapter on it gets its rows' low-rank updates added after each
    `linear` (:meth:`model.lora.ExpertLoraStack.add_delta`).
    """
    linear = _dequantized_linear if linear is None else linear
    flat = indices.flatten()
    order = torch.argsort(flat, stable=True)
    num_experts = mlp.mlp1_bias.shape[0]
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    token_of = order // indices.shape[1]
    x = t[token_of]
    h = t.new_empty(flat.numel(), mlp.mlp1_bias.shape[1])
    y = t.new_empty(flat.numel(), t.shape[1])
    up, down = _used(mlp.mlp1_lora, lora), _used(mlp.mlp2_lora, lora)
    slots = lora[token_of] if lora is not None else None
    adapted_up, adapted_down = (_adapted(s, slots, flat[order], num_experts) for s in (up, down))
    other = None  # per pair, the stacks' columns of other slots than its own (both stacks have one layout)
    if slots is not None and (stack := up or down) is not None:
        other = slots[:, None] != stack.column_slot
    rows_per_group = max(1, MOE_GROUP_BYTES // (h.shape[1] * h.element_size()))
    for group in _groups(_spans(counts), rows_per_group):
        start, end = group[0][1], group[-1][2]
        for e, lo, hi in group:
            linear(x[lo:hi], mlp.mlp1_weight, e, mlp.mlp1_bias[e], h[lo:hi])
            if up is not None and other is not None and adapted_up[e]:
                up.add_delta(h[lo:hi], e, x[lo:hi], other[lo:hi])
        a = swiglu(h[start:end], mlp.swiglu_alpha, mlp.swiglu_limit)
        for e, lo, hi in group:
            rows = a[lo - start : hi - start]
            linear(rows, mlp.mlp2_weight, e, mlp.mlp2_bias[e], y[lo:hi])
            if down is not None and other is not None and adapted_down[e]:
                down.add_delta(y[lo:hi], e, rows, other[lo:hi])
    y *= weights.flatten()[order, None]
    return torch.zeros_like(t).index_add_(0, token_of, y)


def _adapted(
    stack: ExpertLoraStack | None, slots: torch.Tensor | None, experts: torch.Tensor, num_experts: int
) -> list[int]:
    """Per expert, how many of its pairs (`slots`, `experts`: each pair's) run with an adapter `stack`
    holds (none when `stack` is None): experts with none skip the low-rank products."""
    if stack is None or slots is None:
        return [0] * num_experts
    filled = torch.tensor(sorted(stack.filled), device=slots.device)
    return torch.bincount(experts[torch.isin(slots, filled)], minlength=num_experts).tolist()


def _dequantized_linear(
    x: torch.Tensor, weight: MXFP4Weight, e: int, bias: torch.Tensor, out: torch.Tensor
) -> None:
    prepacked.linear(x, weight.expert(e, x.dtype), bias, out=out)


# experts_fused: an expert with more tokens than this is dequantized and multiplied by oneDNN instead, where
# the dequantization, paid once, costs less than the fused kernel's products for every token. At gpt-oss
# widths on a 2-core AVX-512 CPU (`benchmarks/cpu_bench.py --matrix-tokens`, benchmarks/README.md) the
# float32 kernel and the dequantize path crossed between 512 and 2048 tokens; the bfloat16 kernel
# (VDPBF16PS, AVX512-BF16) was still ahead at 2048.
FUSED_MAX_ROWS = 512
FUSED_MAX_ROWS_BF16 = 1024  # bfloat16 inputs where the kernel multiplies them natively


def _fused_linear(
    x: torch.Tensor, weight: MXFP4Weight, e: int, bias: torch.Tensor, out: torch.Tensor
) -> None:
    native = x.dtype == torch.bfloat16 and cpu_mxfp4.native_bf16()
    if weight.dense is not None or x.shape[0] > (FUSED_MAX_ROWS_BF16 if native else FUSED_MAX_ROWS):
        _dequantized_linear(x, weight, e, bias, out)
    else:
        out.copy_(cpu_mxfp4.mxfp4_linear(x, weight.blocks[e], weight.scales[e], bias, paired=weight.paired))


def experts_fused(
    mlp: ExpertWeights,
    t: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`experts_grouped` with each packed expert multiplied straight from its MXFP4 bytes by the fused
    CPU kernel (:func:`model.kernels.cpu_mxfp4.mxfp4_linear`), never dequantized: at decode the
    dequantization was most of the step. Dense experts (:attr:`ExpertMode.DEQUANTIZED`, a fine-tune's) and
    experts with more than :data:`FUSED_MAX_ROWS` tokens (:data:`FUSED_MAX_ROWS_BF16` for native bfloat16)
    take the dequantize path. A single token without adapters (a batch-1 decode step) takes its k experts,
    their SwiGLU and sum in one call (:func:`_experts_one_token`), the same sums. Needs
    :func:`model.kernels.cpu_mxfp4.available` (:meth:`model.kernels.Kernels.for_device` checks it)."""
    if (
        t.shape[0] == 1
        and lora is None
        and t.dtype == torch.bfloat16
        and mlp.mlp1_weight.dense is None
        and mlp.mlp2_weight.dense is None
        and cpu_mxfp4.native_bf16()
    ):
        return _experts_one_token(mlp, t, indices, weights)
    return experts_grouped(mlp, t, indices, weights, lora, linear=_fused_linear)


def _experts_one_token(
    mlp: ExpertWeights, t: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """:func:`experts_grouped` with :func:`_fused_linear` for one token `t [1, H]`, equal to it bit for
    bit, in one call (:func:`model.kernels.cpu_mxfp4.experts_one_token`) instead of two kernel calls per
    expert and the grouping, SwiGLU and sum around them: at batch 1 those were a large part of a layer's
    time besides the bytes."""
    up, down = mlp.mlp1_weight, mlp.mlp2_weight
    return cpu_mxfp4.experts_one_token(
        t,
        (up.blocks, up.scales, mlp.mlp1_bias),
        (down.blocks, down.scales, mlp.mlp2_bias),
        indices,
        weights,
        mlp.swiglu_alpha,
        mlp.swiglu_limit,
        up_paired=up.paired,
        down_paired=down.paired,
    )


EXPERTS_PER_CALL = 32  # experts dequantized together by experts_batched


def experts_batched(
    mlp: ExpertWeights,
    t: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same sums with a fixed number of kernel launches, for GPUs.

    The loop of :func:`experts_grouped` issues its matmuls (and their bias copies) expert by expert, which on
    a GPU takes longer to issue than the work takes to run. Here the active experts' weights are dequantized
    together and their tokens go through two batched matmuls, padded to the busiest expert's count; experts
    are taken :data:`EXPERTS_PER_CALL` at a time so the dequantized weights stay bounded (about 1.6 GB in
    bf16 at gpt-oss widths). Per-request adapters on the experts add two more batched matmuls to each
    (:meth:`model.lora.ExpertLoraStack.delta` over the chunk's experts, padding rows on slot 0).
    """
    up, down = _used(mlp.mlp1_lora, lora), _used(mlp.mlp2_lora, lora)
    flat = indices.flatten()
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    token_of = order // indices.shape[1]
    weight_of = weights.flatten()[order]
    counts = torch.bincount(flat, minlength=mlp.mlp1_bias.shape[0])
    # Each assignment's row within its expert's group: its rank among the assignments sorted before it.
    slot = torch.arange(flat.numel(), device=t.device) - (counts.cumsum(0) - counts)[sorted_experts]
    counts_host = counts.tolist()  # the one host sync: which experts are active and the padded width
    active = [e for e, c in enumerate(counts_host) if c]
    out = torch.zeros_like(t)
    for first in range(0, len(active), EXPERTS_PER_CALL):
        chunk = active[first : first + EXPERTS_PER_CALL]
        width = max(counts_host[e] for e in chunk)
        ids = torch.tensor(chunk, device=t.device)
        compact = torch.full_like(counts, -1)
        compact[ids] = torch.arange(len(chunk), device=t.device)
        group = compact[sorted_experts]
        taken = (group >= 0).nonzero().squeeze(1) if len(chunk) < len(active) else None
        g, rows, tok, w = (
            (group, slot, token_of, weight_of)
            if taken is None
            else (group[taken], slot[taken], token_of[taken], weight_of[taken])
        )
        x = t.new_zeros(len(chunk), width, t.shape[1])
        x[g, rows] = t[tok]
        h = torch.baddbmm(
            mlp.mlp1_bias[ids].unsqueeze(1), x, mlp.mlp1_weight.experts(chunk, t.dtype).transpose(1, 2)
        )
        slots = None  # each padded row's adapter slot, when an adapter changes these experts
        if lora is not None and (up is not None or down is not None):
            slots = lora.new_zeros(len(chunk), width)
            slots[g, rows] = lora[tok]
        if up is not None and slots is not None:
            h += up.delta(ids, x, slots)
        a = swiglu(h, mlp.swiglu_alpha, mlp.swiglu_limit)
        y = torch.baddbmm(
            mlp.mlp2_bias[ids].unsqueeze(1), a, mlp.mlp2_weight.experts(chunk, t.dtype).transpose(1, 2)
        )
        if down is not None and slots is not None:
            y += down.delta(ids, a, slots)
        out.index_add_(0, tok, y[g, rows] * w[:, None])
    return out
