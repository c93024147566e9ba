"""MXFP4: the OCP microscaling 4-bit format gpt-oss stores its expert weights in.

A weight row of K values is cut into K/32 blocks. Each block is 16 bytes of e2m1 values (element 2j in the low
nibble of byte j, element 2j+1 in the high nibble) plus one e8m0 scale byte: value = fp4 · 2^(scale − 127).
Checkpoint tensors are ``blocks [..., G, 16]`` (uint8) and ``scales [..., G]`` (uint8); dequantized they are
``[..., G·32]``.

:func:`dequantize_reference` decodes nibble by nibble, exactly as the format is specified;
:func:`dequantize` is the fast path used at run time (one 256-entry byte table and one scale table) and
is compared with the reference in tests. :func:`pair_rows` lays blocks out for the CPU's single-token kernel,
:func:`unpair_rows` back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_SIZE = 32
BYTES_PER_BLOCK = BLOCK_SIZE // 2
SCALE_BIAS = 127

# e2m1: sign bit, two exponent bits, one mantissa bit. Index = the 4-bit code.
FP4_VALUES: tuple[float, ...] = (
    +0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip


def _check(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BYTES_PER_BLOCK or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}: "
            f"expected blocks = scales + ({BYTES_PER_BLOCK},)"
        )


def dequantize_reference(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Plain twin of :func:`dequantize`: split nibbles, look each code up, scale by 2^(e − 127)."""
    _check(blocks, scales)
    table = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    low = table[(blocks & 0x0F).long()]
    high = table[(blocks >> 4).long()]
    # Interleave so that byte j yields elements 2j (low nibble) then 2j+1 (high nibble).
    values = torch.stack((low, high), dim=-1).flatten(-2)  # [..., G, 32]
    exponents = scales.to(torch.int32) - SCALE_BIAS
    values = torch.ldexp(values, exponents.unsqueeze(-1).to(torch.float32))
    return values.flatten(-2).to(dtype)


_TABLES: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(byte → its two values [256, 2], scale byte → 2^(s − 127) [256]), built once per device and dtype."""
    key = (device, dtype)
    if key not in _TABLES:
        fp4 = torch.tensor(FP4_VALUES, dtype=torch.float32)
        codes = torch.arange(256)
        pairs = torch.stack((fp4[codes & 0x0F], fp4[codes >> 4]), dim=-1)
        # e8m0 255 is NaN by the spec; 2^128 overflows float32 to inf, which is as unusable, so keep it.
        powers = torch.exp2(torch.arange(256, dtype=torch.float64) - SCALE_BIAS).to(torch.float32)
        # The products fp4 · 2^e are exact in bf16 as long as the power is a normal bf16 number, which covers
        # every scale a trained checkpoint uses (bf16 shares float32's exponent range).
        _TABLES[key] = (pairs.to(device=device, dtype=dtype), powers.to(device=device, dtype=dtype))
    return _TABLES[key]


_CPU_CHUNK = 8192  # MXFP4 blocks dequantized per step on the CPU


def dequantize(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Fast dequantization: one gather from a byte table and one multiply by the block's power of two.

    `out`, if given, is a contiguous ``[..., G·32]`` tensor of `dtype` to write into and return.
    """
    _check(blocks, scales)
    pairs, powers = _tables(blocks.device, dtype)
    groups = blocks.shape[-2]
    flat_blocks, flat_scales = blocks.reshape(-1, groups, BYTES_PER_BLOCK), scales.reshape(-1, groups)
    shape = (*blocks.shape[:-2], groups * BLOCK_SIZE)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=blocks.device)
    if out.shape != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {list(shape)}")
    flat_out = out.view(-1, groups, BLOCK_SIZE)
    # On the CPU, work through a few rows at a time: whole-matrix int32 index and gather temporaries (tens of
    # MB per expert) are kept by the C allocator after use and inflate peak RSS (the model benchmark prints
    # it). On a GPU the caching allocator reuses them, and one launch beats many.
    rows = max(1, _CPU_CHUNK // groups if blocks.device.type == "cpu" else flat_blocks.shape[0])
    for r in range(0, flat_blocks.shape[0], rows):
        # `embedding` is torch's fastest CPU gather and takes int32 indices (half of int64's traffic).
        values = F.embedding(flat_blocks[r : r + rows].int(), pairs).flatten(-2)  # [rows, G, 32]
        torch.mul(
            values, F.embedding(flat_scales[r : r + rows].int(), powers[:, None]), out=flat_out[r : r + rows]
        )
    return out


def quantize(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``[..., K]`` values (K a multiple of 32) to MXFP4: returns (blocks [..., K/32, 16], scales).

    The scale of a block is the smallest power of two that brings its largest magnitude within ±6, and each
    value is rounded to the nearest e2m1 code. The tests round-trip values through it.
    """
    if values.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"last dimension {values.shape[-1]} is not a multiple of {BLOCK_SIZE}")
    x = values.float().unflatten(-1, (-1, BLOCK_SIZE))
    amax = x.abs().amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-SCALE_BIAS, 127)
    scaled = x / torch.exp2(exponent).unsqueeze(-1)
    fp4 = torch.tensor(FP4_VALUES, dtype=torch.float32, device=values.device)
    codes = (scaled.unsqueeze(-1) - fp4).abs().argmin(dim=-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponent + SCALE_BIAS).to(torch.uint8)
    return blocks, scales


# The row-pair layout the CPU's one-token kernel reads (model/kernels/cpu_mxfp4.cpp, "Row pairs", says why):
# blocks per interleaved segment.
PAIR_SEGMENT = 16


def pair_rows(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`blocks [..., N, G, 16]` (N even) in the row-pair layout, same shape: rows 2p and 2p + 1 together, per
    segment of :data:`PAIR_SEGMENT` blocks row 2p's bytes then row 2p + 1's, each segment's 64-byte chunk c
    holding bytes 4c .. 4c + 3 of each of its blocks; then the blocks after the last segment, row 2p's and row
    2p + 1's as they are. Written into `out` (contiguous, the same shape) if given, with no temporaries.
    :func:`unpair_rows` undoes it."""
    *lead, rows, groups, width = blocks.shape
    if rows % 2 or width != BYTES_PER_BLOCK:
        raise ValueError(f"row pairs need an even number of rows of MXFP4 blocks, got {tuple(blocks.shape)}")
    out = torch.empty_like(blocks, memory_format=torch.contiguous_format) if out is None else out
    whole = groups // PAIR_SEGMENT * PAIR_SEGMENT
    # Four bytes move together: permuted as 32-bit words, a quarter of the elements to copy.
    words = blocks.contiguous().view(torch.int32).view(*lead, rows // 2, 2, groups, 4)
    flat = out.view(torch.int32).view(*lead, rows // 2, 2 * groups * 4)
    cut = 2 * whole * 4
    # [..., P, h, S, block i, word c] -> [..., P, S, h, c, i]
    segments = words[..., :whole, :].unflatten(-2, (-1, PAIR_SEGMENT)).movedim(-4, -3).movedim(-1, -2)
    flat[..., :cut].view(*lead, rows // 2, whole // PAIR_SEGMENT, 2, 4, PAIR_SEGMENT).copy_(segments)
    flat[..., cut:].view(*lead, rows // 2, 2, (groups - whole) * 4).copy_(words[..., whole:, :].flatten(-2))
    return out


def unpair_rows(paired: torch.Tensor) -> torch.Tensor:
    """The rows of :func:`pair_rows`' layout back in their own order."""
    *lead, rows, groups, _ = paired.shape
    whole = groups // PAIR_SEGMENT * PAIR_SEGMENT
    flat = paired.contiguous().view(torch.int32).view(*lead, rows // 2, 2 * groups * 4)
    out = torch.empty(paired.shape, dtype=paired.dtype, device=paired.device)
    words = out.view(torch.int32).view(*lead, rows // 2, 2, groups, 4)
    cut = 2 * whole * 4
    # [..., P, S, h, c, i] -> [..., P, h, S, i, c]
    segments = flat[..., :cut].view(*lead, rows // 2, whole // PAIR_SEGMENT, 2, 4, PAIR_SEGMENT)
    words[..., :whole, :].unflatten(-2, (-1, PAIR_SEGMENT)).copy_(segments.movedim(-3, -4).movedim(-1, -2))
    words[..., whole:, :].flatten(-2).copy_(flat[..., cut:].view(*lead, rows // 2, 2, (groups - whole) * 4))
    return out
