"""The mixture of experts for decode steps in Triton: MXFP4 weights decoded in registers, expert ids read on
the device, no host sync.

Two launches per MoE layer, shaped as matrix-vector products over the active (token, expert) pairs:

* :func:`_mlp1_swiglu`: one program per (pair, block of intermediate columns) reads the pair's expert id,
  streams that expert's gate and up rows once (gpt-oss interleaves them: row 2i is gate i, row 2i+1 is up i),
  and applies the bias and the clamped SwiGLU in its epilogue;
* :func:`_mlp2_combine`: one program per (token, block of hidden columns) runs the token's experts in slot
  order, each with its bias and routing weight, and sums them in registers: deterministic, no atomics.

The weights stay in the checkpoint layout (``blocks [E, N, G, 16]``, ``scales [E, N, G]``): a row is G * 16
contiguous bytes, read as ``[BLOCK_N, BLOCK_G, 16]`` tiles. An e2m1 code is turned into its float32 bits by
bit construction (exact) and an e8m0 scale into ``2^(s - 127)`` the same way, so nothing is dequantized to
memory.
Each block's 16 byte pairs are reduced first and multiplied by the block's scale once; sums are float32 and
rounded once, at the store.

Twin: :func:`moe_reference` (dequantize, then the plain per-token loop), compared in tests under the Triton
interpreter on a CPU and on a GPU where there is one. Triton is imported only by this module, which CPU
inference never loads.
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
    out_ptr,  # [T, H], the activations' dtype
    H,
    INTER,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
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
    tl.store(out_ptr + token.to(tl.int64) * H + cols, total.to(out_ptr.dtype.element_ty), mask=mask)


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
) -> torch.Tensor:
    """Weighted sum of each token's experts: `t [T, H]`, `indices`/`weights` `[T, K]` (on the device, never
    read by the host); `mlp1`/`mlp2` are (blocks, scales, bias) of the stacked experts. Returns `[T, H]` in
    `t`'s dtype."""
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
    out = torch.empty_like(t)
    _mlp2_combine[(tokens, triton.cdiv(hidden, BLOCK_ROWS))](
        act,
        ids,
        weights.reshape(-1).contiguous(),
        blocks2,
        scales2,
        bias2,
        out,
        hidden,
        inter,
        top_k,
        BLOCK_ROWS,
        BLOCK_GROUPS,
    )
    return out


# Up to this many tokens (a decode batch) the kernels above run: no host sync, so the step can be captured in
# a CUDA graph. Past a few tokens they read an expert once per token routed to it where the batched matmuls
# read it once, but those sync and dequantize every active expert to memory (about 1.3 GB of traffic per 4
# experts at gpt-oss widths), so the kernels should still read fewer bytes at 64 tokens; gpu_bench times both
# at 1, 8 and 64. Longer steps are prompts' and take the batched matmuls (until a grouped kernel does).
DECODE_MAX_TOKENS = 64


def experts_triton(
    mlp: ExpertWeights,
    t: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """The experts seam's implementation for GPUs: decode steps through :func:`moe_decode` on the packed
    MXFP4 weights, larger steps (and dequantized weights) through :func:`experts_batched`, and so do steps
    with per-request adapters while one on these experts is loaded (its update enters between the two
    matmuls, which :func:`moe_decode` fuses)."""
    adapted = lora is not None and any(s is not None and s.filled for s in (mlp.mlp1_lora, mlp.mlp2_lora))
    if t.shape[0] > DECODE_MAX_TOKENS or mlp.mlp1_weight.dense is not None or adapted:
        return experts_batched(mlp, t, indices, weights, lora)
    return moe_decode(
        t,
        indices,
        weights,
        (mlp.mlp1_weight.blocks, mlp.mlp1_weight.scales, mlp.mlp1_bias),
        (mlp.mlp2_weight.blocks, mlp.mlp2_weight.scales, mlp.mlp2_bias),
        mlp.swiglu_alpha,
        mlp.swiglu_limit,
    )


def moe_reference(
    t: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    mlp1: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    mlp2: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """Plain twin of :func:`moe_decode` in float32: dequantize each used expert, then token by token."""
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
    return out.to(t.dtype)
