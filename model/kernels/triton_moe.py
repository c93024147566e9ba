"""The mixture of experts in Triton: MXFP4 weights decoded in registers, expert ids read on the device, no
host sync. Two shapes of the same sums, chosen by the step's token count (:func:`experts_triton`).

**Decode** (up to :data:`DECODE_MAX_TOKENS` tokens): two launches per MoE layer, shaped as matrix-vector
products over the active (token, expert) pairs:

* :func:`_mlp1_swiglu`: one program per (pair, block of intermediate columns) reads the pair's expert id,
  streams that expert's gate and up rows once (gpt-oss interleaves them: row 2i is gate i, row 2i+1 is up i),
  and applies the bias and the clamped SwiGLU in its epilogue;
* :func:`_mlp2_combine`: one program per (token, block of hidden columns) runs the token's experts in slot
  order, each with its bias and routing weight, and sums them in registers: deterministic, no atomics. A
  fused decode layer has it add the residual stream too (:func:`experts_triton_residual`).

A few tokens read few experts and the products are skinny, so these kernels are bound by the weight bytes and
use no tensor cores. They read an expert once per pair routed to it, which a prompt's thousands of tokens
cannot afford.

**Prefill and large batches** (:func:`moe_grouped`): a grouped GEMM, each expert's weights read once per
block of its pairs, multiplied on the tensor cores:

* :func:`moe_align` sorts the pairs by expert on the device into a buffer of a capacity the host knows from
  the shapes alone (``pairs + min(experts, pairs) * (BLOCK_M - 1)``: every active expert's pairs padded up
  to a multiple of BLOCK_M), and maps each BLOCK_M-row block to its expert, -1 for the blocks left unused.
  The grid is sized by that bound, so nothing is read back to the host (no ``.tolist()``, no data-dependent
  shape): the step can be captured in a CUDA graph. Programs whose block is unused exit at once.
* :func:`_grouped_mlp1_swiglu`: a program per (block, tile of intermediate columns) gathers its pairs'
  token rows and multiplies them by the expert's gate and up rows with ``tl.dot``, float32 accumulation; the
  weight tile is decoded from MXFP4 in registers into the activations' dtype (exact: an e2m1 value times a
  power of two has a 2-bit mantissa, which bfloat16 holds); bias and clamped SwiGLU in the epilogue; the
  activations are written in the sorted order, so the second GEMM reads its rows contiguously.
* :func:`_grouped_mlp2`: the same over the expert's second matrix, bias and routing weight in the epilogue,
  each pair's row written to its own place in a ``[pairs, H]`` float32 buffer: no two programs write one row.
* :func:`_combine_slots` sums each token's rows in slot order (the order :func:`moe_reference` adds them) and
  rounds once: deterministic where an atomic scatter-add would depend on the programs' timing.

A byte holds elements 2j (low nibble) and 2j+1 (high nibble) of its row, so each K step multiplies the even
activation columns by the low nibbles' tile and the odd ones by the high nibbles': two dots, no shuffle of the
decoded values. Float32 activations (the tests', a debug model's) take float32 dots at IEEE precision, not
TF32, so the interpreter and the GPU agree with the twin to float32 rounding.

The weights stay in the checkpoint layout (``blocks [E, N, G, 16]``, ``scales [E, N, G]``): a row is G * 16
contiguous bytes. An e2m1 code is turned into its float32 bits by bit construction (exact) and an e8m0 scale
into ``2^(s - 127)`` the same way, so nothing is dequantized to memory. In the decode kernels each block's 16
byte pairs are reduced first and multiplied by the block's scale once; sums are float32 and rounded once, at
the store.

Twin: :func:`moe_reference` (dequantize, then the plain per-token loop), compared in tests under the Triton
interpreter on a CPU and on a GPU where there is one (``benchmarks/gpu_bench.py`` checks and times both
shapes). Triton is imported only by this module, which CPU inference never loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.kernels.experts import ExpertWeights, experts_batched
from model.kernels.mxfp4 import dequantize_reference


@triton.jit
def _e2m1(code):  # Triton signature
    """Float32 value of 4-bit e2m1 codes (uint32): sign, 2 exponent bits, 1 mantissa bit."""
    sign = (code >> 3) & 1
    exponent = (code >> 1) & 3
    mantissa = code & 1
    # Normal codes: exponent field e + 126 (bias 127, e2m1's bias 1); subnormal (e = 0): m * 0.5.
    normal = ((exponent + 126) << 23) | (mantissa << 22)
    bits = tl.where(exponent == 0, mantissa * 0x3F000000, normal) | (sign << 31)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e8m0(scale):
    """Float32 2^(s - 127) of e8m0 bytes (uint32); s = 0 is the subnormal 2^-127."""
    return tl.where(scale == 0, 0x00400000, scale << 23).to(tl.float32, bitcast=True)


@triton.jit
def _mxfp4_rows_dot(
    blocks_ptr,
    scales_ptr,
    x_ptr,
    expert,
    rows,  # [BLOCK_N] row indices of the expert's matrix
    row_mask,
    N,
    G,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Float32 dot products of the expert's `rows` with the float32 vector at `x_ptr` (G * 32 values)."""
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    byte = tl.arange(0, 16)
    base_rows = (expert * N + rows).to(tl.int64) * G
    for g0 in range(0, G, BLOCK_G):
        groups = g0 + tl.arange(0, BLOCK_G)
        group_mask = groups < G
        tile_mask = row_mask[:, None, None] & group_mask[None, :, None]
        offsets = (base_rows[:, None, None] + groups[None, :, None]) * 16 + byte[None, None, :]
        packed = tl.load(blocks_ptr + offsets, mask=tile_mask, other=0).to(tl.uint32)
        low = _e2m1(packed & 0xF)
        high = _e2m1(packed >> 4)
        x_offsets = groups[:, None] * 32 + 2 * byte[None, :]
        x_mask = group_mask[:, None]
        x_even = tl.load(x_ptr + x_offsets, mask=x_mask, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + x_offsets + 1, mask=x_mask, other=0.0).to(tl.float32)
        per_block = tl.sum(low * x_even[None, :, :] + high * x_odd[None, :, :], axis=2)  # [BLOCK_N, BLOCK_G]
        scale_bytes = tl.load(
            scales_ptr + base_rows[:, None] + groups[None, :],
            mask=row_mask[:, None] & group_mask[None, :],
            other=0,
        ).to(tl.uint32)
        acc += tl.sum(per_block * _e8m0(scale_bytes), axis=1)
    return acc


@triton.jit
def _mlp1_swiglu(
    x_ptr,  # [T, H] activations (normed)
    ids_ptr,  # [T * K] int expert of each pair
    blocks_ptr,  # [E, 2I, H/32, 16] uint8
    scales_ptr,  # [E, 2I, H/32] uint8
    bias_ptr,  # [E, 2I]
    out_ptr,  # [T * K, I] float32
    H,
    INTER,
    K: tl.constexpr,  # experts per token
    alpha,
    limit,
    BLOCK_I: tl.constexpr,
    BLOCK_G: tl.constexpr,
) -> None:
    pair = tl.program_id(0)
    token = pair // K
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = cols < INTER
    G = H // 32
    x = x_ptr + token.to(tl.int64) * H
    rows = 2 * INTER
    gate = _mxfp4_rows_dot(blocks_ptr, scales_ptr, x, expert, 2 * cols, mask, rows, G, BLOCK_I, BLOCK_G)
    up = _mxfp4_rows_dot(blocks_ptr, scales_ptr, x, expert, 2 * cols + 1, mask, rows, G, BLOCK_I, BLOCK_G)
    bias = bias_ptr + expert * 2 * INTER
    gate += tl.load(bias + 2 * cols, mask=mask, other=0.0).to(tl.float32)
    up += tl.load(bias + 2 * cols + 1, mask=mask, other=0.0).to(tl.float32)
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    activated = gate * tl.sigmoid(alpha * gate) * (up + 1.0)
    tl.store(out_ptr + pair.to(tl.int64) * INTER + cols, activated, mask=mask)


@triton.jit
def _mlp2_combine(
    act_ptr,  # [T * K, I] float32 from _mlp1_swiglu
    ids_ptr,  # [T * K] int
    weights_ptr,  # [T * K] routing weights
    blocks_ptr,  # [E, H, I/32, 16] uint8
    scales_ptr,  # [E, H, I/32] uint8
    bias_ptr,  # [E, H]
    residual_ptr,  # [T, H] residual stream, read when RESIDUAL
    out_ptr,  # [T, H], the activations' dtype
    H,
    INTER,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    RESIDUAL: tl.constexpr,  # out = residual + the experts' sum, rounded once
) -> None:
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < H
    G = INTER // 32
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for slot in tl.static_range(K):
        pair = token * K + slot
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        weight = tl.load(weights_ptr + pair).to(tl.float32)
        act = act_ptr + pair.to(tl.int64) * INTER
        y = _mxfp4_rows_dot(blocks_ptr, scales_ptr, act, expert, cols, mask, H, G, BLOCK_N, BLOCK_G)
        y += tl.load(bias_ptr + expert * H + cols, mask=mask, other=0.0).to(tl.float32)
        total += weight * y
    row = token.to(tl.int64) * H + cols
    if RESIDUAL:
        total += tl.load(residual_ptr + row, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row, total.to(out_ptr.dtype.element_ty), mask=mask)


# Tile sizes: BLOCK_G = 8 groups of 16 bytes reads full 128-byte lines of a weight row.
BLOCK_ROWS = 32
BLOCK_GROUPS = 8


def moe_decode(
    t: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    mlp1: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    mlp2: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    alpha: float,
    limit: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted sum of each token's experts: `t [T, H]`, `indices`/`weights` `[T, K]` (on the device, never
    read by the host); `mlp1`/`mlp2` are (blocks, scales, bias) of the stacked experts. Returns `[T, H]` in
    `t`'s dtype; with `residual [T, H]`, ``residual + the sum``, added in the second kernel before its one
    rounding."""
    tokens, hidden = t.shape
    top_k = indices.shape[1]
    blocks1, scales1, bias1 = mlp1
    blocks2, scales2, bias2 = mlp2
    inter = blocks1.shape[1] // 2
    if (blocks1.shape[2] * 32, blocks2.shape[1], blocks2.shape[2] * 32) != (hidden, hidden, inter):
        raise ValueError(
            f"experts {tuple(blocks1.shape)} and {tuple(blocks2.shape)} do not fit {hidden} activations"
        )
    t = t.contiguous()
    ids = indices.reshape(-1).contiguous()
    act = torch.empty(tokens * top_k, inter, dtype=torch.float32, device=t.device)
    _mlp1_swiglu[(tokens * top_k, triton.cdiv(inter, BLOCK_ROWS))](
        t, ids, blocks1, scales1, bias1, act, hidden, inter, top_k, alpha, limit, BLOCK_ROWS, BLOCK_GROUPS
    )
    if residual is not None and residual.shape != t.shape:
        raise ValueError(f"residual {tuple(residual.shape)} does not fit activations {tuple(t.shape)}")
    out = torch.empty_like(t)
    _mlp2_combine[(tokens, triton.cdiv(hidden, BLOCK_ROWS))](
        act,
        ids,
        weights.reshape(-1).contiguous(),
        blocks2,
        scales2,
        bias2,
        out if residual is None else residual.contiguous(),  # not read without a residual
        out,
        hidden,
        inter,
        top_k,
        BLOCK_ROWS,
        BLOCK_GROUPS,
        residual is not None,
    )
    return out


@triton.jit
def _mxfp4_tile(
    blocks_ptr,
    scales_ptr,
    expert,
    rows,  # [BLOCK_N] row indices of the expert's matrix
    row_mask,
    N,
    G,
    packed_bytes,  # [BLOCK_KB] byte indices within a row
    byte_mask,
    dtype: tl.constexpr,
):
    """The transposed weight tiles ``[BLOCK_KB, BLOCK_N]`` of the expert's `rows` at `packed_bytes`, in
    `dtype`: the low nibbles' values (even columns of the matrix) and the high nibbles' (odd columns)."""
    base_rows = (expert * N + rows).to(tl.int64) * G
    mask = byte_mask[:, None] & row_mask[None, :]
    packed = tl.load(blocks_ptr + base_rows[None, :] * 16 + packed_bytes[:, None], mask=mask, other=0)
    packed = packed.to(tl.uint32)
    # One scale per 16 bytes: the loads of a group's bytes repeat its address, which the cache serves.
    scale_bytes = tl.load(scales_ptr + base_rows[None, :] + packed_bytes[:, None] // 16, mask=mask, other=0)
    scale = _e8m0(scale_bytes.to(tl.uint32))
    low = (_e2m1(packed & 0xF) * scale).to(dtype)
    high = (_e2m1(packed >> 4) * scale).to(dtype)
    return low, high


@triton.jit
def _grouped_mlp1_swiglu(
    x_ptr,  # [T, H] activations (normed)
    sorted_pairs_ptr,  # [CAPACITY] int32 pair (token * K + slot) of each row, PAIRS where padding
    block_expert_ptr,  # [CAPACITY / BLOCK_M] int32 expert of each block, -1 where unused
    blocks_ptr,  # [E, 2I, H/32, 16] uint8
    scales_ptr,  # [E, 2I, H/32] uint8
    bias_ptr,  # [E, 2I]
    act_ptr,  # [CAPACITY, I] in x's dtype, rows in the sorted order
    H,
    INTER,
    PAIRS,
    K: tl.constexpr,
    alpha,
    limit,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,  # bytes of a row per step: 2 * BLOCK_KB columns
    PRECISION: tl.constexpr,
) -> None:
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    if expert < 0:
        return
    slots = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + slots)
    valid = pairs < PAIRS
    x_rows = x_ptr + (pairs // K).to(tl.int64) * H
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < INTER
    dtype = x_ptr.dtype.element_ty
    rows = 2 * INTER
    G = H // 32
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b0 in range(0, H // 2, BLOCK_KB):
        packed_bytes = b0 + tl.arange(0, BLOCK_KB)
        byte_mask = packed_bytes < H // 2
        x_mask = valid[:, None] & byte_mask[None, :]
        x_even = tl.load(x_rows[:, None] + 2 * packed_bytes[None, :], mask=x_mask, other=0.0)
        x_odd = tl.load(x_rows[:, None] + 2 * packed_bytes[None, :] + 1, mask=x_mask, other=0.0)
        low, high = _mxfp4_tile(
            blocks_ptr, scales_ptr, expert, 2 * cols, col_mask, rows, G, packed_bytes, byte_mask, dtype
        )
        gate = tl.dot(x_even, low, gate, input_precision=PRECISION)
        gate = tl.dot(x_odd, high, gate, input_precision=PRECISION)
        low, high = _mxfp4_tile(
            blocks_ptr, scales_ptr, expert, 2 * cols + 1, col_mask, rows, G, packed_bytes, byte_mask, dtype
        )
        up = tl.dot(x_even, low, up, input_precision=PRECISION)
        up = tl.dot(x_odd, high, up, input_precision=PRECISION)
    bias = bias_ptr + expert * rows
    gate += tl.load(bias + 2 * cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    up += tl.load(bias + 2 * cols + 1, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    activated = gate * tl.sigmoid(alpha * gate) * (up + 1.0)
    out = act_ptr + slots.to(tl.int64)[:, None] * INTER + cols[None, :]
    tl.store(out, activated.to(dtype), mask=valid[:, None] & col_mask[None, :])


@triton.jit
def _grouped_mlp2(
    act_ptr,  # [CAPACITY, I] from _grouped_mlp1_swiglu
    sorted_pairs_ptr,
    block_expert_ptr,
    weights_ptr,  # [PAIRS] routing weights
    blocks_ptr,  # [E, H, I/32, 16] uint8
    scales_ptr,  # [E, H, I/32] uint8
    bias_ptr,  # [E, H]
    y_ptr,  # [PAIRS, H] float32: each pair's weighted expert output
    H,
    INTER,
    PAIRS,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,
    PRECISION: tl.constexpr,
) -> None:
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    if expert < 0:
        return
    slots = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + slots)
    valid = pairs < PAIRS
    a_rows = act_ptr + slots.to(tl.int64) * INTER
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < H
    dtype = act_ptr.dtype.element_ty
    G = INTER // 32
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b0 in range(0, INTER // 2, BLOCK_KB):
        packed_bytes = b0 + tl.arange(0, BLOCK_KB)
        byte_mask = packed_bytes < INTER // 2
        a_mask = valid[:, None] & byte_mask[None, :]
        a_even = tl.load(a_rows[:, None] + 2 * packed_bytes[None, :], mask=a_mask, other=0.0)
        a_odd = tl.load(a_rows[:, None] + 2 * packed_bytes[None, :] + 1, mask=a_mask, other=0.0)
        low, high = _mxfp4_tile(
            blocks_ptr, scales_ptr, expert, cols, col_mask, H, G, packed_bytes, byte_mask, dtype
        )
        acc = tl.dot(a_even, low, acc, input_precision=PRECISION)
        acc = tl.dot(a_odd, high, acc, input_precision=PRECISION)
    acc += tl.load(bias_ptr + expert * H + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    acc *= tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    out = y_ptr + pairs.to(tl.int64)[:, None] * H + cols[None, :]
    tl.store(out, acc, mask=valid[:, None] & col_mask[None, :])


@triton.jit
def _combine_slots(
    y_ptr,  # [T * K, H] float32
    out_ptr,  # [T, H]
    H,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
) -> None:
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < H
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for slot in tl.static_range(K):
        total += tl.load(y_ptr + (token * K + slot) * H + cols, mask=mask, other=0.0)
    tl.store(out_ptr + token * H + cols, total.to(out_ptr.dtype.element_ty), mask=mask)


def grouped_block_m(pairs: int, experts: int) -> int:
    """Rows of a grouped block: about an expert's average share of the pairs, 16 (the least ``tl.dot``
    takes) to 64, so that blocks are mostly full at a few pairs per expert and the tensor cores get tall
    tiles at a prompt's thousands."""
    share = -(-pairs // max(1, experts))
    return min(64, max(16, triton.next_power_of_2(share)))


def grouped_capacity(pairs: int, experts: int, block_m: int) -> int:
    """Rows of the sorted buffer: each active expert (at most `min(experts, pairs)`) pads its pairs up to a
    multiple of `block_m`, adding at most `block_m - 1` rows; rounded up to whole blocks."""
    bound = pairs + min(experts, pairs) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


def moe_align(indices: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs of `indices [T, K]` sorted by expert on the device: `sorted_pairs
    [capacity]` int32 (pair `token * K + slot`; `T * K` in the padding) with each expert's pairs in pair order
    from a multiple of `block_m`, and `block_expert [capacity / block_m]` int32, each block's expert or -1.
    Every shape comes from :func:`grouped_capacity`, and no op reads a value back to the host (a histogram
    by ``scatter_add_``, not CUDA's ``bincount``, which reads its input's range back)."""
    flat = indices.reshape(-1).to(torch.int64)
    pairs = flat.numel()
    capacity = grouped_capacity(pairs, num_experts, block_m)
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    rank = torch.arange(pairs, device=device) - (counts.cumsum(0) - counts)[sorted_experts]
    destination = (padded_end - padded)[sorted_experts] + rank
    sorted_pairs = torch.full((capacity,), pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, destination, order.to(torch.int32))
    block_starts = torch.arange(0, capacity, block_m, device=device)
    owner = torch.searchsorted(padded_end, block_starts, right=True)
    block_expert = torch.where(owner < num_experts, owner, -1).to(torch.int32)
    return sorted_pairs, block_expert


# Tiles of the grouped kernels: BLOCK_N columns of output, BLOCK_KB bytes (2 * BLOCK_KB columns) of each
# weight row per step. Sizes for the GPU; gpu_bench times them (a sweep is tuning left to a GPU session).
GROUPED_BLOCK_N = 64
GROUPED_BLOCK_KB = 64
COMBINE_BLOCK = 256  # hidden columns per program of the combine


def moe_grouped(
    t: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    mlp1: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    mlp2: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    alpha: float,
    limit: float,
    block_m: int | None = None,
) -> torch.Tensor:
    """:func:`moe_decode`'s sums as a grouped GEMM (module docstring), for prompts and large batches. `t`
    is bfloat16 or float32 (the dtype of the dots); `block_m` overrides :func:`grouped_block_m`."""
    tokens, hidden = t.shape
    top_k = indices.shape[1]
    blocks1, scales1, bias1 = mlp1
    blocks2, scales2, bias2 = mlp2
    num_experts, inter = blocks1.shape[0], blocks1.shape[1] // 2
    if (blocks1.shape[2] * 32, blocks2.shape[1], blocks2.shape[2] * 32) != (hidden, hidden, inter):
        raise ValueError(
            f"experts {tuple(blocks1.shape)} and {tuple(blocks2.shape)} do not fit {hidden} activations"
        )
    if t.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"the grouped experts multiply bfloat16 or float32, not {t.dtype}")
    pairs = tokens * top_k
    block_m = block_m or grouped_block_m(pairs, num_experts)
    sorted_pairs, block_expert = moe_align(indices, num_experts, block_m)
    capacity = sorted_pairs.numel()
    precision = "ieee" if t.dtype == torch.float32 else "tf32"  # tf32 only names the default: bf16 ignores it
    block_kb_1 = min(GROUPED_BLOCK_KB, max(16, triton.next_power_of_2(hidden // 2)))
    block_kb_2 = min(GROUPED_BLOCK_KB, max(16, triton.next_power_of_2(inter // 2)))
    t = t.contiguous()
    act = torch.empty(capacity, inter, dtype=t.dtype, device=t.device)
    _grouped_mlp1_swiglu[(capacity // block_m, triton.cdiv(inter, GROUPED_BLOCK_N))](
        t,
        sorted_pairs,
        block_expert,
        blocks1,
        scales1,
        bias1,
        act,
        hidden,
        inter,
        pairs,
        top_k,
        alpha,
        limit,
        block_m,
        GROUPED_BLOCK_N,
        block_kb_1,
        precision,
    )
    y = torch.empty(pairs, hidden, dtype=torch.float32, device=t.device)
    _grouped_mlp2[(capacity // block_m, triton.cdiv(hidden, GROUPED_BLOCK_N))](
        act,
        sorted_pairs,
        block_expert,
        weights.reshape(-1).contiguous(),
        blocks2,
        scales2,
        bias2,
        y,
        hidden,
        inter,
        pairs,
        block_m,
        GROUPED_BLOCK_N,
        block_kb_2,
        precision,
    )
    out = torch.empty_like(t)
    _combine_slots[(tokens, triton.cdiv(hidden, COMBINE_BLOCK))](y, out, hidden, top_k, COMBINE_BLOCK)
    return out


# Up to this many tokens (a decode batch) the GEMV kernels run; longer steps take the grouped GEMM. Both are
# free of host syncs, so either can be captured in a CUDA graph.
#
# Whether decode batches below this should take the grouped GEMM too is a question of bytes against launches,
# which only a GPU answers. The GEMV kernels read an expert once per pair routed to it (at 64 tokens, top-4 of
# 32 experts: 256 expert reads where 32 would do, less what L2 catches of the repeats) in 2 launches; the
# grouped GEMM reads each active expert once per block of its pairs, but its routing costs about a dozen small
# torch launches and its padded blocks are mostly empty at a few pairs per expert. By bytes alone the grouped
# GEMM wins from about 16 tokens on; the launches push that up. Until gpu_bench's "grouped" section
# times both at 8, 16, 32 and 64 tokens on the real widths (the smallest count where `moe_grouped` beats
# `moe_decode`, printed as `moe_grouped_from`), decode stays on the GEMV kernels, the path the decode graphs
# were checked with: lower this to that count, if it is below 64, once it is measured.
DECODE_MAX_TOKENS = 64


def experts_triton(
    mlp: ExpertWeights,
    t: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """The experts seam's implementation for GPUs, on the packed MXFP4 weights: decode steps through
    :func:`moe_decode`, longer ones through :func:`moe_grouped`. Dense weights (dequantized at load, a
    fine-tune's) take :func:`experts_batched`, and so do steps with per-request adapters while one on these
    experts is loaded (its update enters between the two matmuls, which the kernels fuse), and longer steps
    in a dtype the grouped dots do not take."""
    kernels = _kernels(mlp, t, lora)
    if kernels is None:
        return experts_batched(mlp, t, indices, weights, lora)
    run = moe_grouped if kernels == "grouped" else moe_decode
    return run(t, indices, weights, *_packed(mlp), mlp.swiglu_alpha, mlp.swiglu_limit)


def experts_triton_residual(
    mlp: ExpertWeights,
    x: torch.Tensor,
    t: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x + experts_triton(mlp, t, indices, weights, lora)``: the residual stream `x` after an MoE block.
    A step that :func:`experts_triton` runs through :func:`moe_decode` gets the add in the second kernel
    (one launch fewer; the sum rounded once, not the experts' output and then the sum); every other step
    adds after the experts, as the block's forward does."""
    if _kernels(mlp, t, lora) == "decode":
        return moe_decode(t, indices, weights, *_packed(mlp), mlp.swiglu_alpha, mlp.swiglu_limit, residual=x)
    return x + experts_triton(mlp, t, indices, weights, lora)


def _kernels(mlp: ExpertWeights, t: torch.Tensor, lora: torch.Tensor | None) -> str | None:
    """Which of this module's kernels :func:`experts_triton` runs a step through: "decode", "grouped", or
    None where :func:`experts_batched` takes it."""
    adapted = lora is not None and any(s is not None and s.filled for s in (mlp.mlp1_lora, mlp.mlp2_lora))
    grouped = t.shape[0] > DECODE_MAX_TOKENS
    if (
        mlp.mlp1_weight.dense is not None
        or adapted
        or (grouped and t.dtype not in (torch.bfloat16, torch.float32))
    ):
        return None
    return "grouped" if grouped else "decode"


def _packed(
    mlp: ExpertWeights,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The (blocks, scales, bias) of the experts' two matrices."""
    return (
        (mlp.mlp1_weight.blocks, mlp.mlp1_weight.scales, mlp.mlp1_bias),
        (mlp.mlp2_weight.blocks, mlp.mlp2_weight.scales, mlp.mlp2_bias),
    )


def moe_reference(
    t: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    mlp1: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    mlp2: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    alpha: float,
    limit: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain twin of :func:`moe_decode` and :func:`moe_grouped` in float32: dequantize each used expert,
    then token by token; `residual` added to the sum before the one rounding."""
    out = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
    for n in range(t.shape[0]):
        x = t[n].float()
        for j in range(indices.shape[1]):
            e = int(indices[n, j])
            h = dequantize_reference(mlp1[0][e], mlp1[1][e], torch.float32) @ x + mlp1[2][e].float()
            gate = h[::2].clamp(max=limit)
            up = h[1::2].clamp(min=-limit, max=limit)
            a = gate * torch.sigmoid(alpha * gate) * (up + 1)
            y = dequantize_reference(mlp2[0][e], mlp2[1][e], torch.float32) @ a + mlp2[2][e].float()
            out[n] += float(weights[n, j]) * y
    if residual is not None:
        out += residual.float()
    return out.to(t.dtype)
