"""The CPU prepacked linear against its plain twin, alone and in the whole bf16 model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.gpt_oss import AttentionMetadata, ContiguousKVCache, GptOss
from model.host_memory import HUGE_PAGE, is_on_huge_pages
from model.kernels import cpu_mxfp4, prepacked
from model.kernels.experts import experts_grouped, experts_reference

# Whether this machine's torch can prepack bf16 weights at all: the model tests below only mean something where
# it can, and everything must fall back to plain weights where it cannot.
CAN_PREPACK = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
needs_prepack = pytest.mark.skipif(not CAN_PREPACK, reason="no oneDNN bf16 on this CPU")


def bf16_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to the rounding of the bf16 outputs (a different summation order may flip the last bit)."""
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-3)


def test_prepack_applies_to_bf16_cpu_weights_only(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randn(48, 64)
    assert prepacked.prepack(w) is w  # float32 stays plain
    assert prepacked.prepack(w.bfloat16()).is_mkldnn == CAN_PREPACK
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    bf16 = w.bfloat16()
    assert prepacked.prepack(bf16) is bf16


def test_for_decode_keeps_linears_plain_on_huge_pages_where_the_gemv_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    g = torch.Generator().manual_seed(3)
    large = torch.randn(HUGE_PAGE // 2 // 64 + 5, 64, generator=g).bfloat16()  # over 2 MB
    small = torch.randn(48, 64, generator=g).bfloat16()
    if cpu_mxfp4.native_bf16():
        kept = prepacked.for_decode(large)
        assert not kept.is_mkldnn
        assert kept.data_ptr() % HUGE_PAGE == 0
        assert kept.data_ptr() != large.data_ptr()
        assert torch.equal(kept, large)
        assert prepacked.for_decode(kept) is kept  # on huge pages already: no second copy
        assert prepacked.for_decode(small) is small  # under one huge page: as it is
    monkeypatch.setattr(cpu_mxfp4, "native_bf16", lambda: False)
    assert prepacked.for_decode(small).is_mkldnn == CAN_PREPACK
    f32 = large.float()
    assert prepacked.for_decode(f32) is f32


@needs_prepack
@pytest.mark.parametrize(("out_features", "in_features"), [(96, 64), (7, 33), (576, 320)])
@pytest.mark.parametrize("bias", [True, False])
def test_prepacked_linear_equals_plain_twin_at_every_row_count(
    out_features: int, in_features: int, bias: bool
) -> None:
    g = torch.Generator().manual_seed(out_features + in_features)
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    b = torch.randn(out_features, generator=g).bfloat16() if bias else None
    packed = prepacked.prepack(w)
    assert packed.is_mkldnn
    assert packed.shape == w.shape
    assert packed.dtype == w.dtype
    assert torch.equal(prepacked.plain(packed), w)
    for rows in (1, 2, 3, 8, 16, 17, 64):
        x = torch.randn(rows, in_features, generator=g).bfloat16()
        got = prepacked.linear(x, packed, b)
        assert got.shape == (rows, out_features)
        assert got.dtype == torch.bfloat16
        bf16_close(got, prepacked.linear_reference(x, packed, b))
        bf16_close(got, F.linear(x, w, b))
    # A strided input (a view into a wider activation) and no rows at all.
    wide = torch.randn(5, 2 * in_features, generator=g).bfloat16()
    bf16_close(prepacked.linear(wide[:, ::2], packed, b), F.linear(wide[:, ::2], w, b))
    assert prepacked.linear(wide[:0, :in_features], packed, b).shape == (0, out_features)


def test_plain_weights_run_plain_f_linear() -> None:
    g = torch.Generator().manual_seed(0)
    w, x, b = torch.randn(8, 16, generator=g), torch.randn(3, 16, generator=g), torch.randn(8, generator=g)
    assert prepacked.plain(w) is w
    assert torch.equal(prepacked.linear(x, w, b), F.linear(x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("pack", [True, False])
def test_linear_into_out_equals_the_returned_result(dtype: torch.dtype, bias: bool, pack: bool) -> None:
    """`out=`: float32 rows of a wider buffer, written in place, equal to the plain call's result upcast;
    rows past them untouched. Plain and (where bf16 allows it) prepacked weights."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 24, generator=g).to(dtype)
    b = torch.randn(40, generator=g).to(dtype) if bias else None
    weight = prepacked.prepack(w) if pack else w
    x = torch.randn(3, 24, generator=g).to(dtype)
    buffer = torch.full((5, 40), 7.0)
    got = prepacked.linear(x, weight, b, out=buffer[:3])
    assert got.data_ptr() == buffer.data_ptr()
    assert torch.equal(got, prepacked.linear(x, weight, b).float())
    assert torch.all(buffer[3:] == 7.0)


@needs_prepack
@pytest.mark.parametrize("experts", ["dequantized", "packed"])
def test_prepacked_bf16_model_equals_plain_bf16_model(checkpoints: dict[str, Path], experts: str) -> None:
    """Whole model, prefill of two sequences then decode through the cache: prepacked weights against the same
    checkpoint loaded with plain weights (the reference)."""
    path = checkpoints["hf"]
    fast = GptOss.from_checkpoint(path, dtype=torch.bfloat16, expert_mode=experts, progress=False)
    plain = GptOss.from_checkpoint(
        path, dtype=torch.bfloat16, expert_mode=experts, prepack=False, progress=False
    )
    # The linears: plain for the bf16 GEMV where it is built (the large ones on huge pages), else prepacked.
    gemv = cpu_mxfp4.native_bf16()
    assert fast.unembedding.weight.is_mkldnn != gemv
    assert fast.block[0].attn.qkv.weight.is_mkldnn != gemv
    if gemv:
        assert fast.unembedding.weight.data_ptr() % HUGE_PAGE == 0
        assert is_on_huge_pages(fast.unembedding.weight)
    assert not plain.unembedding.weight.is_mkldnn
    mlp1 = fast.block[0].mlp.mlp1_weight
    if experts == "dequantized":
        assert all(w.is_mkldnn for w in mlp1.dense)
        assert mlp1.blocks.numel() == 0
    else:
        assert mlp1.dense is None
        assert mlp1.blocks.dtype == torch.uint8

    g = torch.Generator().manual_seed(11)
    lens = [23, 6]
    ids = torch.randint(0, 201088, (sum(lens),), generator=g)
    logits = {}
    for name, model in (("fast", fast), ("plain", plain)):
        cache = ContiguousKVCache(model.config, 2, 40, dtype=torch.bfloat16)
        steps = [model(ids, AttentionMetadata.build(lens, cache_slots=[0, 1]), cache)]
        for n in range(4):
            nxt = torch.tensor([5 + n, 900 + n])
            meta = AttentionMetadata.build([1, 1], [lens[0] + n + 1, lens[1] + n + 1], cache_slots=[0, 1])
            steps.append(model(nxt, meta, cache))
        logits[name] = torch.cat(steps)
    scale = logits["plain"].abs().max().item()
    torch.testing.assert_close(logits["fast"], logits["plain"], rtol=0, atol=2e-2 * scale)
    assert torch.equal(logits["fast"].argmax(-1), logits["plain"].argmax(-1))


@needs_prepack
def test_prepacked_experts_equal_reference_twin(checkpoints: dict[str, Path]) -> None:
    """The grouped experts on prepacked weights against the token-by-token twin on the plain weights."""
    model = GptOss.from_checkpoint(
        checkpoints["hf"], dtype=torch.bfloat16, expert_mode="dequantized", progress=False
    )
    mlp = model.block[1].mlp
    t = torch.randn(13, model.config.hidden_size, generator=torch.Generator().manual_seed(3)).bfloat16()
    indices, weights = mlp.route(t)
    fast = experts_grouped(mlp, t, indices, weights)
    slow = experts_reference(mlp, t, indices, weights)
    torch.testing.assert_close(fast.float(), slow.float(), rtol=0, atol=2e-2 * slow.abs().max().item())


def test_float32_unembedding_is_stored_transposed_with_the_same_logits(checkpoints: dict[str, Path]) -> None:
    """A float32 model on the CPU keeps its vocabulary projection column-major (same values, same logits to
    rounding); without `prepack` it stays row-major, and the other float32 weights stay as they were."""
    path = checkpoints["hf"]
    fast = GptOss.from_checkpoint(path, dtype=torch.float32, progress=False)
    plain_model = GptOss.from_checkpoint(path, dtype=torch.float32, prepack=False, progress=False)
    vocab, hidden = fast.unembedding.weight.shape
    assert fast.unembedding.weight.stride() == (1, vocab)
    assert plain_model.unembedding.weight.stride() == (hidden, 1)
    assert fast.block[0].attn.qkv.weight.is_contiguous()
    assert torch.equal(fast.unembedding.weight, plain_model.unembedding.weight)
    ids = torch.randint(0, vocab, (19,), generator=torch.Generator().manual_seed(5))
    meta = AttentionMetadata.build([12, 7])
    torch.testing.assert_close(fast(ids, meta), plain_model(ids, meta), rtol=0, atol=1e-5)
