"""MXFP4: the fast dequantization against the nibble-by-nibble reference, and the format's bit layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.kernels.mxfp4 import (
    FP4_VALUES,
    PAIR_SEGMENT,
    dequantize,
    dequantize_reference,
    pair_rows,
    quantize,
    unpair_rows,
)


def test_bit_layout_low_nibble_first_and_scale_bias_127() -> None:
    # Byte 0x71: low nibble 1 → +0.5 (element 0), high nibble 7 → +6 (element 1); byte 0xF8: -0 then -6.
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0], blocks[0, 1] = 0x71, 0xF8
    for scale, factor in ((127, 1.0), (128, 2.0), (125, 0.25)):
        values = dequantize_reference(blocks, torch.tensor([scale], dtype=torch.uint8), torch.float32)
        assert values.shape == (32,)
        assert values[:4].tolist() == [0.5 * factor, 6.0 * factor, -0.0, -6.0 * factor]
        assert torch.equal(
            values, dequantize(blocks, torch.tensor([scale], dtype=torch.uint8), torch.float32)
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_equals_reference_on_every_byte_and_scale(dtype: torch.dtype) -> None:
    # All 256 bytes in every position, with every scale a real checkpoint could use.
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 254, 4, 16), generator=g, dtype=torch.uint8)
    blocks[0, :, :, :] = torch.arange(256, dtype=torch.uint8).repeat(64)[: 254 * 4 * 16].view(254, 4, 16)
    scales = torch.arange(1, 255, dtype=torch.uint8)[None, :, None].expand(3, 254, 4).contiguous()
    assert torch.equal(dequantize(blocks, scales, dtype), dequantize_reference(blocks, scales, dtype))


def test_dequantize_into_a_given_buffer() -> None:
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (2, 5, 3, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 140, (2, 5, 3), generator=g, dtype=torch.uint8)
    out = torch.full((2, 5, 96), float("nan"), dtype=torch.bfloat16)
    assert dequantize(blocks, scales, torch.bfloat16, out=out) is out
    assert torch.equal(out, dequantize_reference(blocks, scales, torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        dequantize(blocks, scales, torch.float32, out=out)
    with pytest.raises(ValueError, match="out must be"):
        dequantize(
            blocks, scales, torch.bfloat16, out=torch.empty(2, 96, 5, dtype=torch.bfloat16).transpose(1, 2)
        )


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(100, 140), st.integers(0, 2**31))
def test_quantize_round_trips_representable_values(rows: int, groups: int, scale: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, groups * 32), generator=g)
    codes[:, ::32] = 7  # each block holds a ±6 so its scale is the one chosen
    values = torch.tensor(FP4_VALUES)[codes] * 2.0 ** (scale - 127)
    blocks, scales = quantize(values)
    assert blocks.shape == (rows, groups, 16)
    assert scales.shape == (rows, groups)
    assert torch.equal(dequantize(blocks, scales, torch.float32), values)


def test_rejects_mismatched_shapes_and_dtypes() -> None:
    with pytest.raises(ValueError, match="do not match"):
        dequantize(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8), torch.float32)
    with pytest.raises(TypeError, match="uint8"):
        dequantize(torch.zeros(2, 16, dtype=torch.int8), torch.zeros(2, dtype=torch.uint8), torch.float32)


@pytest.mark.parametrize("groups", [1, 7, 16, 21, 90])
def test_row_pairs_layout_and_its_inverse(groups: int) -> None:
    """:func:`pair_rows` places each byte where the CPU kernel's comment says, keeps the shape, and
    :func:`unpair_rows` takes it back, with any leading dimensions (stacked experts)."""
    g = torch.Generator().manual_seed(groups)
    blocks = torch.randint(0, 256, (3, 6, groups, 16), generator=g, dtype=torch.uint8)
    paired = pair_rows(blocks)
    assert paired.shape == blocks.shape
    assert torch.equal(unpair_rows(paired), blocks)
    whole = groups // PAIR_SEGMENT * PAIR_SEGMENT
    tail = groups - whole
    flat = paired.reshape(3, 3, -1)  # per expert, per pair of rows: its bytes in order
    for expert, pair, half in ((0, 0, 0), (1, 2, 1), (2, 1, 1)):
        row = blocks[expert, 2 * pair + half]
        for block in range(groups):
            for byte in range(16):
                if block < whole:  # segment, then row, then chunk (4 bytes of each block), then block
                    segment, i = divmod(block, PAIR_SEGMENT)
                    chunk, k = divmod(byte, 4)
                    at = segment * 2 * PAIR_SEGMENT * 16 + half * PAIR_SEGMENT * 16 + chunk * 64 + 4 * i + k
                else:  # after the segments: each row's blocks as they are
                    at = whole * 32 + half * tail * 16 + (block - whole) * 16 + byte
                assert flat[expert, pair, at] == row[block, byte]


def test_row_pairs_need_an_even_number_of_rows() -> None:
    with pytest.raises(ValueError, match="even number of rows"):
        pair_rows(torch.zeros(3, 2, 16, dtype=torch.uint8))
