"""The Triton MoE (decode GEMV and grouped GEMM) against its plain twin, its device routing against a plain
sort, and its MXFP4 decoding against the format's reference."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import triton
import triton.language as tl
import triton.runtime.interpreter as interpreter

from model.gpt_oss import GptOss, MLPBlock
from model.kernels import triton_moe
from model.kernels.experts import experts_batched, experts_reference
from model.kernels.mxfp4 import dequantize_reference, quantize
from model.kernels.triton_moe import (
    DECODE_MAX_TOKENS,
    _mxfp4_rows_dot,
    experts_triton,
    experts_triton_residual,
    grouped_capacity,
    moe_align,
    moe_decode,
    moe_grouped,
    moe_reference,
)
from tests.engine.test_sync_free import SyncRecorder
from tests.triton_interpreter import bf16_dots_widened

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ALPHA, LIMIT = 1.702, 7.0


@triton.jit
def _matvec(blocks_ptr, scales_ptr, x_ptr, out_ptr, N, G, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = rows < N
    acc = _mxfp4_rows_dot(blocks_ptr, scales_ptr, x_ptr, 0, rows, mask, N, G, BLOCK_N, BLOCK_G)
    tl.store(out_ptr + rows, acc, mask=mask)


def _matvec_host(blocks: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    rows, groups = scales.shape
    out = torch.empty(rows, dtype=torch.float32, device=DEVICE)
    _matvec[(triton.cdiv(rows, 16),)](blocks, scales, x, out, rows, groups, 16, 4)
    return out


def test_every_code_and_scale_decodes_exactly() -> None:
    """Each weight column picked out by a one-hot vector: every byte value under every scale class (0, the
    subnormal 2^-127; 1; 127, one; 254, the largest finite), bit for bit."""
    groups = 8
    codes = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    blocks = codes.repeat(4, 1)[:, None, :].expand(64, groups, 16).contiguous()  # row r: codes[r % 16]
    scales = (
        torch.tensor([0, 1, 127, 254], dtype=torch.uint8).repeat_interleave(16)[:, None].expand(64, groups)
    )
    scales = scales.contiguous()
    weight = dequantize_reference(blocks, scales, torch.float32)  # [64, groups * 32]
    blocks, scales = blocks.to(DEVICE), scales.to(DEVICE)
    for column in (0, 1, 2, 17, 31, 32 * groups - 1):
        x = torch.zeros(32 * groups, device=DEVICE)
        x[column] = 1.0
        assert torch.equal(_matvec_host(blocks, scales, x).cpu(), weight[:, column])


def test_a_matvec_over_many_groups_with_a_masked_tail() -> None:
    """90 groups (the 20b's width / 32) is no multiple of the tile: the last tile is masked."""
    torch.manual_seed(0)
    blocks, scales = quantize(torch.randn(40, 90 * 32))
    x = torch.randn(90 * 32)
    expected = dequantize_reference(blocks, scales, torch.float32) @ x
    got = _matvec_host(blocks.to(DEVICE), scales.to(DEVICE), x.to(DEVICE)).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def _experts(num: int, rows: int, cols: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    blocks, scales = quantize(torch.randn(num, rows, cols, generator=generator))
    bias = torch.randn(num, rows, generator=generator) * 0.1
    return blocks.to(DEVICE), scales.to(DEVICE), bias.to(DEVICE)


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "hidden", "inter"),
    [(1, 4, 2, 64, 64), (3, 8, 4, 64, 96), (16, 32, 4, 32, 64)],
)
def test_decode_moe_matches_the_reference(
    tokens: int, experts: int, top_k: int, hidden: int, inter: int
) -> None:
    generator = torch.Generator().manual_seed(tokens)
    mlp1 = _experts(experts, 2 * inter, hidden, generator)
    mlp2 = _experts(experts, hidden, inter, generator)
    t = torch.randn(tokens, hidden, generator=generator).to(DEVICE)
    ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1)
    ids, weights = ids.to(torch.int32).to(DEVICE), weights.to(DEVICE)
    got = moe_decode(t, ids, weights, mlp1, mlp2, ALPHA, LIMIT)
    expected = moe_reference(t, ids, weights, mlp1, mlp2, ALPHA, LIMIT)
    assert got.dtype == t.dtype
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_swiglu_clamps_large_gates_and_ups() -> None:
    """Activations large enough that gate and up pass the limit of 7: the clamp in the epilogue matters."""
    generator = torch.Generator().manual_seed(5)
    mlp1 = _experts(4, 2 * 32, 32, generator)
    mlp2 = _experts(4, 32, 32, generator)
    t = (torch.randn(2, 32, generator=generator) * 20).to(DEVICE)
    ids = torch.tensor([[0, 3], [1, 2]], dtype=torch.int32, device=DEVICE)
    weights = torch.tensor([[0.7, 0.3], [0.5, 0.5]], device=DEVICE)
    got = moe_decode(t, ids, weights, mlp1, mlp2, ALPHA, LIMIT)
    expected = moe_reference(t, ids, weights, mlp1, mlp2, ALPHA, LIMIT)
    unclamped = moe_reference(t, ids, weights, mlp1, mlp2, ALPHA, float("inf"))
    assert not torch.allclose(expected, unclamped)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)


def test_bfloat16_activations_come_back_in_bfloat16() -> None:
    generator = torch.Generator().manual_seed(7)
    mlp1 = _experts(4, 2 * 32, 32, generator)
    mlp2 = _experts(4, 32, 32, generator)
    t = torch.randn(2, 32, generator=generator).to(DEVICE, torch.bfloat16)
    ids = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32, device=DEVICE)
    weights = torch.tensor([[0.6, 0.4], [0.2, 0.8]], device=DEVICE, dtype=torch.bfloat16)
    got = moe_decode(t, ids, weights, mlp1, mlp2, ALPHA, LIMIT)
    expected = moe_reference(t.float(), ids, weights.float(), mlp1, mlp2, ALPHA, LIMIT)
    assert got.dtype == torch.bfloat16
    # One rounding at the store (the interpreter truncates where a GPU rounds to nearest): a bf16 ulp or two.
    torch.testing.assert_close(got.float(), expected, rtol=2**-7, atol=2**-7 * expected.abs().max().item())


@pytest.mark.parametrize(("dtype", "tokens"), [(torch.float32, 1), (torch.float32, 5), (torch.bfloat16, 3)])
def test_decode_moe_adds_the_residual_before_its_one_rounding(dtype: torch.dtype, tokens: int) -> None:
    """The residual stream added in the second kernel: float32 as the twin to float32 rounding; bfloat16
    within a bf16 ulp of the float32 twin on the same values (one rounding, which the interpreter
    truncates), where adding to the rounded experts' sum would round twice."""
    generator = torch.Generator().manual_seed(11 + tokens)
    mlp1 = _experts(8, 2 * 64, 32, generator)
    mlp2 = _experts(8, 32, 64, generator)
    t = torch.randn(tokens, 32, generator=generator).to(DEVICE, dtype)
    x = (3 * torch.randn(tokens, 32, generator=generator)).to(DEVICE, dtype)
    ids = torch.stack([torch.randperm(8, generator=generator)[:4] for _ in range(tokens)]).to(DEVICE)
    weights = torch.softmax(torch.randn(tokens, 4, generator=generator), dim=-1).to(DEVICE, dtype)
    got = moe_decode(t, ids, weights, mlp1, mlp2, ALPHA, LIMIT, residual=x)
    assert got.dtype == dtype
    expected = moe_reference(t.float(), ids, weights.float(), mlp1, mlp2, ALPHA, LIMIT, residual=x.float())
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    else:
        torch.testing.assert_close(
            got.float(), expected, rtol=2**-7, atol=2**-7 * expected.abs().max().item()
        )
    without = moe_reference(t.float(), ids, weights.float(), mlp1, mlp2, ALPHA, LIMIT)
    torch.testing.assert_close(expected, without + x.float(), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module", params=["packed", "dequantized"])
def mlp(request: pytest.FixtureRequest, checkpoints: dict[str, Path]) -> MLPBlock:
    model = GptOss.from_checkpoint(
        checkpoints["hf"], device=DEVICE, dtype=torch.float32, expert_mode=request.param, progress=False
    )
    return model.block[1].mlp


@pytest.mark.parametrize("num_tokens", [1, 5, DECODE_MAX_TOKENS + 1])
def test_at_the_seam_decodes_take_the_gemv_and_prompts_the_grouped_kernels(
    mlp: MLPBlock, num_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Triton experts on the model's own MoE block against the reference: decode-sized steps on packed
    weights through the GEMV kernels, larger steps through the grouped GEMM, dequantized weights through the
    batched matmuls."""
    taken: list[str] = []
    for name in ("moe_decode", "moe_grouped", "experts_batched"):
        run = getattr(triton_moe, name)
        monkeypatch.setattr(
            triton_moe, name, lambda *args, name=name, run=run: taken.append(name) or run(*args)
        )
    t = torch.randn(num_tokens, mlp.mlp2_bias.shape[1], generator=torch.Generator().manual_seed(num_tokens))
    t = t.to(DEVICE)
    indices, weights = mlp.route(t)
    expected = experts_reference(mlp, t, indices, weights)
    torch.testing.assert_close(experts_triton(mlp, t, indices, weights), expected, rtol=1e-5, atol=1e-4)
    if mlp.mlp1_weight.dense is not None:
        assert taken == ["experts_batched"]
    else:
        assert taken == ["moe_decode" if num_tokens <= DECODE_MAX_TOKENS else "moe_grouped"]


@pytest.mark.parametrize("num_tokens", [1, 5])
def test_the_residual_joins_the_decode_kernel_and_nothing_else(
    mlp: MLPBlock, num_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MLP block's output from :func:`experts_triton_residual`: packed weights add the residual in the
    decode kernel; dequantized ones (the batched matmuls) add it after, as the block's forward; with an
    adapter loaded on the experts the same."""
    taken: list[str] = []
    for name in ("moe_decode", "experts_batched"):
        run = getattr(triton_moe, name)

        def recorded(*args: Any, name: str = name, run: Any = run, **kwargs: Any) -> torch.Tensor:
            taken.append(name + ("+residual" if "residual" in kwargs else ""))
            return run(*args, **kwargs)

        monkeypatch.setattr(triton_moe, name, recorded)
    generator = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, mlp.mlp2_bias.shape[1], generator=generator).to(DEVICE)
    t = mlp.norm(x)
    indices, weights = mlp.route(t)
    got = experts_triton_residual(mlp, x, t, indices, weights)
    expected = x + experts_reference(mlp, t, indices, weights)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert taken == (["experts_batched"] if mlp.mlp1_weight.dense is not None else ["moe_decode+residual"])


# -- the grouped GEMM ------------------------------------------------------------------------------------------


def _align_twin(indices: torch.Tensor, num_experts: int, block_m: int) -> tuple[list[int], list[int]]:
    """The sorted pairs and block map of :func:`moe_align`, built by a plain loop over the experts."""
    flat = indices.flatten().tolist()
    pairs = len(flat)
    rows: list[int] = []
    owners: list[int] = []
    for e in range(num_experts):
        mine = [p for p, expert in enumerate(flat) if expert == e]
        padded = -(-len(mine) // block_m) * block_m
        rows += mine + [pairs] * (padded - len(mine))
        owners += [e] * (padded // block_m)
    capacity = grouped_capacity(pairs, num_experts, block_m)
    return rows + [pairs] * (capacity - len(rows)), owners + [-1] * (capacity // block_m - len(owners))


def _routing(tokens: int, experts: int, top_k: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """`[tokens, top_k]` distinct experts per token: `random`; `skewed`, drawn from the first half of the
    experts only (the rest get no pair); `one`, every token on the same top_k experts in the same order (all
    the batch's pairs on a few experts, each of them a multiple-block run)."""
    if kind == "one":
        return torch.arange(top_k).flip(0).repeat(tokens, 1)
    pool = experts if kind == "random" else experts // 2
    return torch.stack([torch.randperm(pool, generator=generator)[:top_k] for _ in range(tokens)])


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "block_m", "kind"),
    [(1, 4, 2, 16, "random"), (13, 8, 4, 16, "skewed"), (40, 8, 4, 32, "random"), (70, 32, 4, 16, "one")],
)
def test_routing_sorts_pairs_by_expert_into_padded_blocks(
    tokens: int, experts: int, top_k: int, block_m: int, kind: str
) -> None:
    generator = torch.Generator().manual_seed(tokens)
    indices = _routing(tokens, experts, top_k, kind, generator).to(torch.int32)
    sorted_pairs, block_expert = moe_align(indices.to(DEVICE), experts, block_m)
    rows, owners = _align_twin(indices, experts, block_m)
    assert sorted_pairs.dtype == block_expert.dtype == torch.int32
    assert sorted_pairs.cpu().tolist() == rows
    assert block_expert.cpu().tolist() == owners


def test_routing_makes_no_host_sync() -> None:
    """The routing and the three launches of the grouped path read nothing back to the host; the recorder
    sees the batched matmuls' syncs on the same inputs (else this would prove nothing). The interpreter's
    launches, host copies of every argument here, are not recorded: on a GPU they are launches."""
    generator = torch.Generator().manual_seed(3)
    mlp1 = _experts(8, 2 * 32, 32, generator)
    mlp2 = _experts(8, 32, 32, generator)
    t = torch.randn(20, 32, generator=generator).to(DEVICE)
    indices = _routing(20, 8, 4, "random", generator).to(torch.int32).to(DEVICE)
    weights = torch.softmax(torch.randn(20, 4, generator=generator), -1).to(DEVICE)
    recorder = SyncRecorder()
    launch = interpreter.GridExecutor.__call__

    def paused_launch(self: Any, *args: Any, **kwargs: Any) -> Any:
        with recorder.pause():
            return launch(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(interpreter.GridExecutor, "__call__", paused_launch)
        with recorder.recording():
            moe_grouped(t, indices, weights, mlp1, mlp2, ALPHA, LIMIT)
        assert recorder.syncs == []
        block = _Experts(mlp1, mlp2)
        with recorder.recording():
            experts_batched(block, t, indices, weights)  # type: ignore[arg-type]
        assert "tolist" in recorder.syncs


class _Experts:
    """Just what :func:`experts_batched` reads of an MoE block, around raw packed experts."""

    def __init__(self, mlp1: tuple[torch.Tensor, ...], mlp2: tuple[torch.Tensor, ...]) -> None:
        from model.kernels.experts import MXFP4Weight

        self.mlp1_weight = MXFP4Weight(0, 0, 0)
        self.mlp1_weight.blocks, self.mlp1_weight.scales = mlp1[0], mlp1[1]
        self.mlp2_weight = MXFP4Weight(0, 0, 0)
        self.mlp2_weight.blocks, self.mlp2_weight.scales = mlp2[0], mlp2[1]
        self.mlp1_bias, self.mlp2_bias = mlp1[2], mlp2[2]
        self.swiglu_alpha, self.swiglu_limit = ALPHA, LIMIT
        self.mlp1_lora = self.mlp2_lora = None


def _grouped_case(
    tokens: int, experts: int, top_k: int, hidden: int, inter: int, kind: str, seed: int, scale: float = 1.0
) -> tuple[Any, ...]:
    generator = torch.Generator().manual_seed(seed)
    mlp1 = _experts(experts, 2 * inter, hidden, generator)
    mlp2 = _experts(experts, hidden, inter, generator)
    t = (torch.randn(tokens, hidden, generator=generator) * scale).to(DEVICE)
    ids = _routing(tokens, experts, top_k, kind, generator).to(torch.int32).to(DEVICE)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1).to(DEVICE)
    return t, ids, weights, mlp1, mlp2


# Float32 activations take float32 dots at IEEE precision: the kernels and the twin differ only in the order
# of their float32 sums (the twin's matmul over the dequantized rows, the kernels' even and odd halves and K
# steps), each off by a few ulps of the largest terms. 1e-5 of the output's largest value is ~100 ulps at
# these widths, and a wrong pair, expert, column or slot is off by the order of the output itself.
FLOAT32_TOLERANCE = 1e-5


def _close(got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    atol = tolerance * expected.abs().max().item()
    torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=atol)


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "hidden", "inter", "kind", "block_m"),
    [
        (1, 4, 2, 64, 32, "random", None),  # one block per expert, 15 of its 16 rows padding
        (13, 8, 4, 64, 32, "skewed", None),  # half the experts without a pair
        (40, 8, 4, 32, 64, "random", 16),  # experts over several blocks, the last partly filled
        (37, 8, 4, 64, 32, "one", 16),  # all 37 tokens on the same 4 experts: 3 blocks each
        (70, 16, 4, 64, 96, "random", None),  # past the decode bound; a masked column tile (96 of 128)
        (24, 8, 4, 160, 32, "random", None),  # two K steps of 64 bytes, the second masked (16 of 64)
    ],
)
def test_grouped_moe_matches_the_reference(
    tokens: int, experts: int, top_k: int, hidden: int, inter: int, kind: str, block_m: int | None
) -> None:
    t, ids, weights, mlp1, mlp2 = _grouped_case(tokens, experts, top_k, hidden, inter, kind, seed=tokens)
    got = moe_grouped(t, ids, weights, mlp1, mlp2, ALPHA, LIMIT, block_m=block_m)
    expected = moe_reference(t, ids, weights, mlp1, mlp2, ALPHA, LIMIT)
    assert got.dtype == t.dtype
    _close(got, expected, FLOAT32_TOLERANCE)


def test_grouped_swiglu_clamps_large_gates_and_ups() -> None:
    t, ids, weights, mlp1, mlp2 = _grouped_case(20, 8, 4, 32, 32, "random", seed=5, scale=20.0)
    got = moe_grouped(t, ids, weights, mlp1, mlp2, ALPHA, LIMIT)
    expected = moe_reference(t, ids, weights, mlp1, mlp2, ALPHA, LIMIT)
    unclamped = moe_reference(t, ids, weights, mlp1, mlp2, ALPHA, float("inf"))
    assert not torch.allclose(expected, unclamped)
    _close(got, expected, FLOAT32_TOLERANCE)


@pytest.fixture
def bfloat16_dots() -> Iterator[None]:
    """The interpreter's bfloat16 dots widened (:func:`tests.triton_interpreter.bf16_dots_widened`) so the
    kernels under test stay the GPU's code."""
    with bf16_dots_widened():
        yield


@pytest.mark.usefixtures("bfloat16_dots")
@pytest.mark.parametrize(("tokens", "kind"), [(9, "random"), (33, "one")])
def test_grouped_moe_in_bfloat16(tokens: int, kind: str) -> None:
    """bfloat16 activations, as a GPU model runs: bfloat16 dots of exactly decoded weights, float32 sums,
    the SwiGLU's output and the result each rounded once to bfloat16. Each rounding is within 2^-8 of its
    value (the interpreter truncates, a GPU rounds to nearest: 2^-9), and the first one's errors enter the
    second GEMM's sum: measured 0.008 of the largest output under the interpreter. 2^-6 of it allows both
    and still fails a wrong row, expert or weight by far."""
    t, ids, weights, mlp1, mlp2 = _grouped_case(tokens, 8, 4, 64, 32, kind, seed=tokens)
    t, weights = t.to(torch.bfloat16), weights.to(torch.bfloat16)
    got = moe_grouped(t, ids, weights, mlp1, mlp2, ALPHA, LIMIT)
    expected = moe_reference(t.float(), ids, weights.float(), mlp1, mlp2, ALPHA, LIMIT)
    assert got.dtype == torch.bfloat16
    _close(got, expected, 2**-6)


def test_bfloat16_dots_are_wrong_unpatched_in_the_interpreter() -> None:
    """Why :func:`bfloat16_dots` exists: without it the interpreter's bfloat16 dot is far off, so the test
    above would fail for the interpreter's sake rather than the kernel's (on a GPU the same call is right)."""
    t, ids, weights, mlp1, mlp2 = _grouped_case(9, 8, 4, 64, 32, "random", seed=9)
    got = moe_grouped(t.to(torch.bfloat16), ids, weights, mlp1, mlp2, ALPHA, LIMIT).float()
    expected = moe_reference(t, ids, weights, mlp1, mlp2, ALPHA, LIMIT)
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    if torch.cuda.is_available():
        assert error < 2**-6
    else:
        assert not error < 2**-6


def test_a_prompt_past_the_decode_bound_through_the_whole_model(
    checkpoints: dict[str, Path], model_fp32: GptOss, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model built with the Triton kernels reads a prompt longer than a decode batch: every layer's experts
    through the grouped GEMM, the logits of every position those of the model on the CPU's kernels."""
    from model.batch import AttentionMetadata
    from model.kernels import Kernels

    grouped = triton_moe.moe_grouped
    calls: list[int] = []
    monkeypatch.setattr(triton_moe, "moe_grouped", lambda *args: calls.append(1) or grouped(*args))
    model = GptOss.from_checkpoint(
        checkpoints["hf"], device=DEVICE, dtype=torch.float32, kernels=Kernels.triton(), progress=False
    )
    length = DECODE_MAX_TOKENS + 6
    prompt = torch.randint(0, 200_000, (length,), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        meta = AttentionMetadata.build([length])
        got = model(prompt.to(DEVICE), meta, None, torch.arange(length, device=DEVICE))
        expected = model_fp32(prompt, AttentionMetadata.build([length]), None, torch.arange(length))
    assert len(calls) == model.config.num_hidden_layers
    _close(got.cpu(), expected, FLOAT32_TOLERANCE)
