"""The fused CPU MXFP4 matmul against its twin (reference dequantization, then a matmul), its use by the CPU
experts, and the fallback where it cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

from model.kernels import Kernels, cpu_mxfp4, prepacked
from model.kernels.cpu_mxfp4 import TILE, mxfp4_linear, mxfp4_linear_reference
from model.kernels.experts import experts_fused, experts_grouped
from model.kernels.mxfp4 import dequantize_reference, pair_rows

# Each shape's rows cycle through these scales (a row keeps one: so that the bound below, relative to the
# row's own magnitude, checks the tiny and the huge rows too) after a run of rows with random mixed scales.
# 0 makes weights down to 2^-128 (float32 subnormals); 252 up to 6·2^125, the largest whose products stay
# finite in float32 (255 is NaN by the spec).
EXTREME_SCALES = (0, 1, 2, 126, 127, 128, 250, 251, 252)


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert cpu_mxfp4.available(), "this machine has a compiler: the fused kernel must build"


def weights(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (rows, cols // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 140, (rows, cols // 32), generator=g, dtype=torch.uint8)
    fixed = rows // 2
    for r in range(fixed, rows):
        scales[r] = EXTREME_SCALES[r % len(EXTREME_SCALES)]
    bias = torch.randn(rows, generator=g)
    return blocks, scales, bias


@pytest.mark.parametrize(
    ("rows", "cols", "tokens"),
    [
        (18, 32, 1),
        (21, 96, 1),
        (19, 512, 1),
        (9, 224, 1),
        (11, 672, 1),
        (5, 1088, 1),
        (7, 1280, 1),
        (45, 2880, 1),
        (40, 64, 2),
        (27, 96, TILE),
        (64, 128, TILE + 5),
        (45, 2880, 3),
        (20, 320, 3 * TILE + 1),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_float64_product(rows: int, cols: int, tokens: int, dtype: torch.dtype) -> None:
    """Against the exact product in float64 of the reference-dequantized weights: float32 accumulation of
    `cols` terms may be off by about cols·2^-24 of the sum of the terms' magnitudes (plus one float32
    subnormal step per term), and a bf16 result by its rounding on top. Token counts cover one tile, a
    partial tile and several; one token (the bf16 path's four-blocks-a-step decode) block counts of every
    remainder by four, with and without whole groups of sixteen, and a partial group of rows."""
    blocks, scales, bias = weights(rows, cols, seed=rows + cols)
    x = _inputs(tokens, cols, dtype)
    _check_against_float64(mxfp4_linear(x, blocks, scales, bias.to(dtype)), x, blocks, scales, bias.to(dtype))


def _inputs(tokens: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens)) * 2.0**-10).to(dtype)


def _check_against_float64(
    got: torch.Tensor, x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor
) -> None:
    """`got` against ``x @ W.T + bias`` in float64 on the reference-dequantized weights, within the bound
    :func:`test_fused_equals_float64_product` gives."""
    cols = x.shape[1]
    w = dequantize_reference(blocks, scales, torch.float32).double()
    exact = x.double() @ w.T + bias.double()
    bound = cols * 2.0**-23 * (x.double().abs() @ w.abs().T + bias.double().abs()) + cols * 2.0**-149
    if x.dtype == torch.bfloat16:
        bound += 2.0**-8 * exact.abs() + 2.0**-133
    assert got.dtype == x.dtype
    assert got.shape == (x.shape[0], blocks.shape[0])
    assert torch.isfinite(got).all()
    error = (got.double() - exact).abs()
    assert (error <= bound).all(), f"worst excess {(error - bound).max().item()}"


@pytest.mark.parametrize(
    ("rows", "cols"), [(18, 32), (10, 224), (20, 512), (12, 672), (8, 1088), (46, 2880), (24, 3072)]
)
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 9])
def test_paired_rows_equal_the_float64_product(rows: int, cols: int, tokens: int) -> None:
    """Blocks in row pairs (:func:`pair_rows`), bfloat16 inputs: up to four tokens through the pairs' own
    loop, with no whole segment of 16 blocks, exactly one, one and a remainder of every kind by four, and
    several; more tokens through the rows put back in order, which gives the checkpoint layout's results bit
    for bit; rows of extreme scales (the float32 loop) in every case, a last partial group of rows, with and
    without a bias."""
    if not cpu_mxfp4.native_bf16():
        pytest.fail("this machine has AVX512-BF16: the kernel's native bfloat16 path must build")
    blocks, scales, bias = weights(rows, cols, seed=rows + cols)
    paired = pair_rows(blocks)
    x = _inputs(tokens, cols, torch.bfloat16)
    for b in (bias.bfloat16(), None):
        got = mxfp4_linear(x, paired, scales, b, paired=True)
        _check_against_float64(got, x, blocks, scales, torch.zeros(rows) if b is None else b)
        if tokens > 4:
            assert torch.equal(got, mxfp4_linear(x, blocks, scales, b))


def test_paired_rows_are_refused_where_the_kernel_cannot_read_them() -> None:
    blocks, scales, _ = weights(4, 64, seed=0)
    with pytest.raises(ValueError, match="bfloat16 inputs"):
        mxfp4_linear(torch.zeros(1, 64), pair_rows(blocks), scales, paired=True)
    with pytest.raises(RuntimeError, match="even number"):
        mxfp4_linear(torch.zeros(1, 64).bfloat16(), blocks[:3], scales[:3], paired=True)


@pytest.mark.parametrize("tokens", [1, 5, 19])
def test_fused_equals_its_twin(tokens: int) -> None:
    """Against :func:`mxfp4_linear_reference` on weights of ordinary scales, with and without a bias, to
    float32's precision of a sum in another order (relative to the largest output: cancellation leaves some
    outputs far smaller than their terms)."""
    blocks, scales, bias = weights(96, 256, seed=7)
    blocks, scales, bias = blocks[:48], scales[:48], bias[:48]  # the random mixed scales only
    x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(1))
    for b in (bias, None):
        expected = mxfp4_linear_reference(x, blocks, scales, b)
        atol = 1e-5 * expected.abs().max().item()
        torch.testing.assert_close(mxfp4_linear(x, blocks, scales, b), expected, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 7, 13])
@pytest.mark.parametrize("rows", [4, 21])
def test_fused_bfloat16_equals_its_twin(tokens: int, rows: int) -> None:
    """bfloat16 inputs on ordinary scales, where AVX512-BF16 multiplies them as they are: the tokens few enough
    to decode in registers and the tiles over decoded rows, a last group of rows partly past the matrix.
    Both sides round a float32 sum to bfloat16, so they may differ by that rounding (relative to the largest
    output, as above)."""
    blocks, scales, bias = weights(2 * rows, 320, seed=rows)
    blocks, scales, bias = blocks[:rows], scales[:rows], bias[:rows]
    x = torch.randn(tokens, 320, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    for b in (bias.bfloat16(), None):
        expected = mxfp4_linear_reference(x, blocks, scales, b).float()
        got = mxfp4_linear(x, blocks, scales, b)
        assert got.dtype == torch.bfloat16
        atol = 2.0**-7 * expected.abs().max().item()
        torch.testing.assert_close(got.float(), expected, rtol=2.0**-7, atol=atol)


def test_fused_decodes_low_nibble_first_and_scales_per_block() -> None:
    """One weight row of five blocks (four decoded together by the single-token path, then one alone), each
    scaled on its own: byte 0x71 is +0.5 (element 0) then +6 (element 1); 0xA0 in block 1 (scaled by 2^3) is
    +0 (element 62) then -1 (63); 0x3C in block 2 (2^-1) is -2 (78) then +1.5 (79); 0x05 in block 3 is +3
    (112) then +0; 0x20 in block 4 (2^1) is +0 (130) then +1 (131). Picking inputs one-hot reads single
    weights back."""
    blocks = torch.zeros(1, 5, 16, dtype=torch.uint8)
    blocks[0, 0, 0], blocks[0, 1, 15], blocks[0, 2, 7], blocks[0, 3, 8], blocks[0, 4, 1] = (
        0x71,
        0xA0,
        0x3C,
        0x05,
        0x20,
    )
    scales = torch.tensor([[127, 130, 126, 127, 128]], dtype=torch.uint8)
    picked = [0, 1, 62, 63, 78, 79, 112, 113, 130, 131, 2]
    expected = [0.5, 6.0, 0.0, -8.0, -1.0, 0.75, 3.0, 0.0, 0.0, 2.0, 0.0]
    x = torch.eye(160)[picked]
    assert mxfp4_linear(x, blocks, scales).flatten().tolist() == expected
    if cpu_mxfp4.native_bf16():  # one token at a time: the path that decodes four blocks a step
        for row, value in zip(x.bfloat16(), expected, strict=True):
            assert mxfp4_linear(row[None], blocks, scales).item() == value


def test_bad_shapes_are_refused() -> None:
    blocks, scales, _ = weights(4, 64, seed=0)
    with pytest.raises(ValueError, match="does not match"):
        mxfp4_linear(torch.zeros(1, 32), blocks, scales)


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("shared_input", [True, False])
def test_experts_one_equals_each_expert_alone(shared_input: bool, paired: bool) -> None:
    """One token through several experts in one call (batch-1 decode): each pair's row equals
    :func:`mxfp4_linear` on that expert alone, bit for bit, with the input shared by every pair (the first
    matrix) or one per pair (the second), experts repeated and out of order, rows of extreme scales (the
    float32 loop) and a last partial group of rows; with and without biases; in the checkpoint's layout and
    in row pairs."""
    if not cpu_mxfp4.native_bf16():
        pytest.fail("this machine has AVX512-BF16: the kernel's native bfloat16 path must build")
    experts, rows, cols = 5, 22 if paired else 21, 544
    stacked = [weights(rows, cols, seed=e) for e in range(experts)]
    blocks = torch.stack([pair_rows(b) if paired else b for b, _, _ in stacked])
    scales = torch.stack([s for _, s, _ in stacked])
    biases = torch.stack([b for _, _, b in stacked])
    ids = torch.tensor([3, 0, 4, 3])
    x = torch.randn(
        1 if shared_input else len(ids), cols, generator=torch.Generator().manual_seed(2)
    ).bfloat16()
    for bias in (biases[ids], None):
        got = cpu_mxfp4.mxfp4_experts_one(x, blocks, scales, bias, ids, paired=paired)
        assert got.dtype == torch.bfloat16
        assert got.shape == (len(ids), rows)
        for p, e in enumerate(ids.tolist()):
            alone = mxfp4_linear(
                x[0 if shared_input else p][None],
                blocks[e],
                scales[e],
                None if bias is None else biases[e],
                paired=paired,
            )
            assert torch.equal(got[p], alone[0])


def test_experts_one_refuses_an_expert_out_of_range() -> None:
    blocks, scales, _ = weights(8, 64, seed=1)
    with pytest.raises(RuntimeError, match="expert id out of range"):
        cpu_mxfp4.mxfp4_experts_one(
            torch.zeros(1, 64).bfloat16(), blocks[None], scales[None], None, torch.tensor([1])
        )


def test_cpu_experts_use_the_fused_kernel() -> None:
    assert Kernels.for_device("cpu").experts is experts_fused


@pytest.mark.parametrize("cause", ["no compiler", "build fails"])
def test_without_the_kernel_the_cpu_keeps_the_dequantize_path(
    cause: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cpu_mxfp4, "_module", None)
    monkeypatch.setattr(cpu_mxfp4, "_failed", False)
    if cause == "no compiler":
        monkeypatch.setattr(cpu_mxfp4.shutil, "which", lambda tool: None)
    else:

        def broken() -> object:
            raise RuntimeError("Error building extension\nc++: fatal error: killed")

        monkeypatch.setattr(cpu_mxfp4, "_build", broken)
    with caplog.at_level(logging.WARNING, logger=cpu_mxfp4.__name__):
        assert Kernels.for_device("cpu").experts is experts_grouped
    assert "fall back to dequantizing" in caplog.text
    assert ("no c++ or ninja found" if cause == "no compiler" else "c++: fatal error: killed") in caplog.text
    assert not cpu_mxfp4.available()  # decided once per process
    with pytest.raises(RuntimeError, match="not built"):
        mxfp4_linear(torch.zeros(1, 32), *weights(2, 32, seed=0)[:2])


needs_gemv = pytest.mark.skipif(not cpu_mxfp4.native_bf16(), reason="no AVX512-BF16 on this CPU")


@needs_gemv
@pytest.mark.parametrize(("out_features", "in_features"), [(203, 2880), (16, 64), (8, 64), (37, 33), (1, 31)])
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 16])
def test_bf16_gemv_equals_its_float32_twin(out_features: int, in_features: int, tokens: int) -> None:
    """Rows in groups of sixteen and a partial last group, widths a multiple of 32 and not (masked tail), odd
    token counts (a single row after pairs), a float32 and a bfloat16 bias and none. Both sides sum the same
    bf16 products in float32, in different orders: each output within float32's rounding of a sum of
    `in_features` terms."""
    g = torch.Generator().manual_seed(out_features * 100 + in_features + tokens)
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    x = torch.randn(tokens, in_features, generator=g).bfloat16()
    bias = torch.randn(out_features, generator=g)
    for b in (bias, bias.bfloat16(), None):
        got = cpu_mxfp4.bf16_gemv(x, w, b)
        assert got.dtype == torch.float32
        assert got.shape == (tokens, out_features)
        expected = cpu_mxfp4.bf16_gemv_reference(x, w, b)
        bound = in_features * 2.0**-23 * (x.float().abs() @ w.float().abs().T) + 1e-6
        assert ((got - expected).abs() <= bound).all()
        # Into given buffers: bfloat16, and float32 holding bfloat16 values; both the same rounding of `got`.
        into = torch.full((tokens, out_features), float("nan"), dtype=torch.bfloat16)
        assert cpu_mxfp4.bf16_gemv(x, w, b, into) is into
        assert torch.equal(into, got.bfloat16())
        rounded = torch.full((tokens, out_features), float("nan"))
        cpu_mxfp4.bf16_gemv(x, w, b, rounded, round_bf16=True)
        assert torch.equal(rounded, got.bfloat16().float())


@needs_gemv
def test_bf16_gemv_rounds_as_torch_does() -> None:
    """The kernel's own float32 -> bfloat16 rounding against torch's: zero products plus a float32 bias, so
    each sum is exactly the bias, chosen on ties (to even, both ways), just beside a tie, beyond bfloat16's
    largest finite value, negative, and NaN."""
    values = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 3.4e38, -2.5 - 2**-7, float("nan")])
    x = torch.ones(1, 32, dtype=torch.bfloat16)
    w = torch.zeros(len(values), 32, dtype=torch.bfloat16)
    got = cpu_mxfp4.bf16_gemv(x, w, values, torch.empty(1, len(values), dtype=torch.bfloat16))[0]
    torch.testing.assert_close(got, values.bfloat16(), rtol=0, atol=0, equal_nan=True)
    assert got[:2].tolist() == [1.0, 1 + 2**-6]  # the ties, to even


@needs_gemv
def test_linear_takes_the_gemv_for_few_bf16_rows_on_a_plain_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 96, generator=g).bfloat16()
    few = torch.randn(cpu_mxfp4.GEMV_MAX_ROWS, 96, generator=g).bfloat16()
    many = torch.randn(cpu_mxfp4.GEMV_MAX_ROWS + 1, 96, generator=g).bfloat16()
    assert cpu_mxfp4.gemv_applies(few, w)
    assert not cpu_mxfp4.gemv_applies(many, w)
    assert not cpu_mxfp4.gemv_applies(few.float(), w.float())
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert not cpu_mxfp4.gemv_applies(few, prepacked.prepack(w))
    # The seam: the GEMV's float32 sums rounded to bf16, returned or written into a float32 `out`.
    got = prepacked.linear(few, w)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, cpu_mxfp4.bf16_gemv(few, w).bfloat16())
    out = torch.empty(cpu_mxfp4.GEMV_MAX_ROWS, 40)
    assert torch.equal(prepacked.linear(few, w, out=out), cpu_mxfp4.bf16_gemv(few, w).bfloat16().float())
    strided = torch.empty(40, cpu_mxfp4.GEMV_MAX_ROWS).t()  # not contiguous: through a copy, same values
    assert torch.equal(prepacked.linear(few, w, out=strided), out)
    calls: list[int] = []
    real = cpu_mxfp4.bf16_gemv
    monkeypatch.setattr(
        cpu_mxfp4, "bf16_gemv", lambda x, *a, **kw: calls.append(x.shape[0]) or real(x, *a, **kw)
    )
    prepacked.linear(many, w)
    prepacked.linear(few[:1], w)
    assert calls == [1]
