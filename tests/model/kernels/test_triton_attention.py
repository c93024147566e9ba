"""The Triton paged decode attention against its plain twin, and the twin against the model's attention."""

from __future__ import annotations

import pytest
import torch

from model.kernels import Kernels
from model.kernels.triton_attention import decode_attention, decode_attention_reference
from tests.model.kernels.test_attention import CASES, check_twin

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK = 4


def _case(
    lengths: list[int],
    window: int,
    *,
    heads: int = 8,
    kv_heads: int = 2,
    dim: int = 16,
    seed: int = 0,
    shifted: bool = False,
) -> tuple[torch.Tensor, ...]:
    """A shuffled pool of blocks, each sequence's table pointing into it, and random queries, keys, values
    and sinks. The table starts at position 0 with released blocks (-1) below the window, or, `shifted`, at
    the window's first block (as the engine hands a sliding layer's tables)."""
    generator = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // BLOCK) for n in lengths]
    pool = sum(blocks_needed) + 3
    order = torch.randperm(pool, generator=generator).tolist()
    tables = torch.full((len(lengths), max(blocks_needed) + 2), -1, dtype=torch.int32)
    starts = torch.zeros(len(lengths), dtype=torch.int64)
    taken = 0
    for s, (n, count) in enumerate(zip(lengths, blocks_needed, strict=True)):
        first = max(n - window, 0) // BLOCK if window else 0
        column_zero = first if shifted else 0
        starts[s] = column_zero * BLOCK
        for j in range(first, count):
            tables[s, j - column_zero] = order[taken]
            taken += 1
    k = torch.randn(pool * BLOCK, kv_heads, dim, generator=generator)
    v = torch.randn(pool * BLOCK, kv_heads, dim, generator=generator)
    q = torch.randn(len(lengths), heads, dim, generator=generator)
    sinks = torch.randn(heads, generator=generator)
    lens = torch.tensor(lengths, dtype=torch.int32)
    return tuple(t.to(DEVICE) for t in (q, k, v, tables, starts, lens, sinks))


@pytest.mark.parametrize(("window", "shifted"), [(0, False), (8, False), (8, True)])
@pytest.mark.parametrize(("lengths", "splits"), [([1], 1), ([1, 7, 37, 16], 4), ([300, 5, 129], 8)])
def test_decode_attention_matches_the_reference(
    lengths: list[int], splits: int, window: int, shifted: bool
) -> None:
    q, k, v, tables, starts, lens, sinks = _case(lengths, window, shifted=shifted)
    got = decode_attention(q, k, v, tables, starts, lens, sinks, 0.25, window, BLOCK, splits=splits)
    expected = decode_attention_reference(q, k, v, tables, starts, lens, sinks, 0.25, window, BLOCK)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_more_splits_than_blocks_leave_empty_splits_harmless() -> None:
    """A 3-token context over 8 splits: most splits see no key and must weigh nothing in the merge."""
    q, k, v, tables, starts, lens, sinks = _case([3, 2], 0)
    got = decode_attention(q, k, v, tables, starts, lens, sinks, 0.5, 0, BLOCK, splits=8)
    expected = decode_attention_reference(q, k, v, tables, starts, lens, sinks, 0.5, 0, BLOCK)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_one_query_head_per_kv_head_and_bfloat16() -> None:
    q, k, v, tables, starts, lens, sinks = _case([9, 20], 0, heads=4, kv_heads=4, dim=32, seed=3)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    got = decode_attention(q, k, v, tables, starts, lens, sinks, 0.2, 0, BLOCK)
    expected = decode_attention_reference(q, k, v, tables, starts, lens, sinks, 0.2, 0, BLOCK)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=2**-6)


def test_the_reference_agrees_with_the_models_attention() -> None:
    """The twin itself, against the model's spec-level attention on the same keys laid out per sequence."""
    from model.batch import AttentionMetadata
    from model.kernels.attention import KVView, attend_reference

    lengths, window = [5, 11], 8
    q, k, v, tables, starts, lens, sinks = (t.cpu() for t in _case(lengths, window, seed=9))
    width = max(lengths)
    keys = torch.zeros(len(lengths), width, k.shape[1], k.shape[2])
    values = torch.zeros_like(keys)
    positions = torch.full((len(lengths), width), -1, dtype=torch.int64)
    for s, n in enumerate(lengths):
        for p in range(max(n - window, 0), n):
            slot = int(tables[s, p // BLOCK]) * BLOCK + p % BLOCK
            keys[s, p], values[s, p], positions[s, p] = k[slot], v[slot], p
    meta = AttentionMetadata.build([1, 1], lengths)
    spec = attend_reference(q, KVView(keys, values, positions), meta, sinks, 0.25, window)
    ours = decode_attention_reference(q, k, v, tables, starts, lens, sinks, 0.25, window, BLOCK)
    torch.testing.assert_close(ours.reshape(spec.shape), spec, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_at_the_seam_decodes_go_to_the_kernel_and_the_rest_to_the_fallback(
    case: str, window: int, dtype: torch.dtype
) -> None:
    """Through the attention seam on the engine's kind of paged cache: store and attend as the reference."""
    check_twin(Kernels.triton().attention, case, window, False, dtype, device=DEVICE.type)
