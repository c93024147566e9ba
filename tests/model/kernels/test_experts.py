"""The MoE experts: the grouped (CPU) and batched (GPU) paths against the token-by-token reference, on packed
and dequantized weights, and the pieces they share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.gpt_oss import GptOss, MLPBlock
from model.kernels import Kernels, cpu_mxfp4
from model.kernels import experts as ex
from model.kernels.experts import (
    Experts,
    experts_batched,
    experts_fused,
    experts_grouped,
    experts_reference,
    swiglu,
)
from model.kernels.mxfp4 import pair_rows
from model.lora import ExpertLoraStack, Update

FAST: dict[str, Experts] = {"grouped": experts_grouped, "batched": experts_batched}


@pytest.fixture(scope="module", params=["packed", "dequantized"])
def mlp(request: pytest.FixtureRequest, checkpoints: dict[str, Path]) -> MLPBlock:
    model = GptOss.from_checkpoint(
        checkpoints["hf"], dtype=torch.float32, expert_mode=request.param, progress=False
    )
    return model.block[1].mlp


def routed(
    mlp: MLPBlock, num_tokens: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = torch.randn(num_tokens, mlp.mlp2_bias.shape[1], generator=torch.Generator().manual_seed(seed))
    t = t.to(dtype)
    return t, *mlp.route(t)


@pytest.mark.parametrize("num_tokens", [1, 13, 300])
@pytest.mark.parametrize("group_bytes", [256 << 10, 3 * 128 * 4])
def test_grouped_equal_reference(
    mlp: MLPBlock, num_tokens: int, group_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the default grouping (all of a decode's experts in one SwiGLU), and groups of at most 3 rows (the
    tiny model's first matmul is 128 wide), so most experts of the longer inputs hold more rows than a group
    and go alone."""
    monkeypatch.setattr(ex, "MOE_GROUP_BYTES", group_bytes)
    t, indices, weights = routed(mlp, num_tokens, 3)
    expected = experts_reference(mlp, t, indices, weights)
    torch.testing.assert_close(experts_grouped(mlp, t, indices, weights), expected)


@pytest.mark.parametrize("num_tokens", [1, 13, 300])
@pytest.mark.parametrize("per_call", [32, 3])
def test_batched_equal_reference(
    mlp: MLPBlock, num_tokens: int, per_call: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All active experts in two batched matmuls, here on the CPU: in one call, and in calls of 3 (the tiny
    model has 8 experts, so assignments are split between calls)."""
    monkeypatch.setattr(ex, "EXPERTS_PER_CALL", per_call)
    t, indices, weights = routed(mlp, num_tokens, 4)
    expected = experts_reference(mlp, t, indices, weights)
    torch.testing.assert_close(experts_batched(mlp, t, indices, weights), expected)


@pytest.mark.parametrize("num_tokens", [1, 13, 300])
@pytest.mark.parametrize("max_rows", [128, 20])
def test_fused_equal_reference(
    mlp: MLPBlock, num_tokens: int, max_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU path on the fused MXFP4 kernel: with the default cut-over, and with experts of more than 20
    rows dequantized instead (so 300 tokens mix both ways within one call). Dense experts (the dequantized
    mode) always take the dequantize path."""
    assert cpu_mxfp4.available()
    monkeypatch.setattr(ex, "FUSED_MAX_ROWS", max_rows)
    t, indices, weights = routed(mlp, num_tokens, 6)
    expected = experts_reference(mlp, t, indices, weights)
    torch.testing.assert_close(experts_fused(mlp, t, indices, weights), expected)


def _adapted(mlp: MLPBlock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Give `mlp` random per-request adapters on its experts: slot 1 on both matmuls, slot 2 on mlp1 only
    (rank 2 of the 3 held), slot 3 empty."""
    generator = torch.Generator().manual_seed(8)
    e, h, i = mlp.mlp1_bias.shape[0], mlp.mlp2_bias.shape[1], mlp.mlp1_bias.shape[1] // 2
    stacks = {}
    for name, inp, out in (("mlp1", h, 2 * i), ("mlp2", i, h)):
        stack = ExpertLoraStack(e, 3, 3, inp, out, dtype=torch.float32)
        for slot, rank in ((1, 3), (2, 2)):
            if name == "mlp2" and slot == 2:
                continue
            a = torch.randn(e, rank, inp, generator=generator) / inp**0.5
            b = torch.randn(e, out, rank, generator=generator)
            stack.install(slot, Update(f"{name}_weight", a, b, 0.5))
        stacks[name] = stack
    monkeypatch.setattr(mlp, "mlp1_lora", stacks["mlp1"], raising=False)
    monkeypatch.setattr(mlp, "mlp2_lora", stacks["mlp2"], raising=False)


@pytest.mark.parametrize("impl", ["grouped", "batched", "fused"])
@pytest.mark.parametrize("num_tokens", [1, 13, 300])
def test_per_request_expert_adapters_equal_reference(
    mlp: MLPBlock, impl: str, num_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each token on its own adapter slot (none, both matmuls, mlp1 only, an empty slot): every fast path's
    low-rank updates per (token, expert) pair equal the reference's, with small groups and chunks so that
    experts of mixed slots are split between them."""
    _adapted(mlp, monkeypatch)
    monkeypatch.setattr(ex, "MOE_GROUP_BYTES", 3 * 128 * 4)
    monkeypatch.setattr(ex, "EXPERTS_PER_CALL", 3)
    monkeypatch.setattr(ex, "FUSED_MAX_ROWS", 20)
    t, indices, weights = routed(mlp, num_tokens, 9)
    lora = torch.randint(0, 4, (num_tokens,), generator=torch.Generator().manual_seed(num_tokens))
    fast = {"grouped": experts_grouped, "batched": experts_batched, "fused": experts_fused}[impl]
    if impl == "fused":
        assert cpu_mxfp4.available()
    expected = experts_reference(mlp, t, indices, weights, lora)
    torch.testing.assert_close(fast(mlp, t, indices, weights, lora), expected)
    base = experts_reference(mlp, t, indices, weights)
    adapted = (lora == 1) | (lora == 2)
    if adapted.any():
        assert (expected[adapted] - base[adapted]).abs().amax(dim=1).min() > 1e-3
    torch.testing.assert_close(expected[~adapted], base[~adapted])  # no adapter, or an empty slot


@pytest.mark.parametrize("num_tokens", [1, 13, 300])
def test_fused_bfloat16_equal_reference(
    checkpoints: dict[str, Path], num_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bfloat16 model's experts, where the kernel multiplies bfloat16 natively (its own token limit, here
    20, so 300 tokens mix both ways), against the reference within bfloat16's rounding of the activations."""
    assert cpu_mxfp4.available()
    monkeypatch.setattr(ex, "FUSED_MAX_ROWS", 20)
    monkeypatch.setattr(ex, "FUSED_MAX_ROWS_BF16", 20)
    mlp = GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.bfloat16, progress=False).block[1].mlp
    t, indices, weights = routed(mlp, num_tokens, 7, torch.bfloat16)
    expected = experts_reference(mlp, t, indices, weights).float()
    got = experts_fused(mlp, t, indices, weights).float()
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_one_token_takes_its_experts_in_one_call_with_the_grouped_paths_sums(
    checkpoints: dict[str, Path], seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch-1 decode step's token in a bfloat16 model: its k experts, SwiGLU and weighted sum run in one
    call, and the result equals the grouped path on the same kernel bit for bit (same rows, SwiGLU,
    weighting and sum order)."""
    if not cpu_mxfp4.native_bf16():
        pytest.fail("this machine has AVX512-BF16: the kernel's native bfloat16 path must build")
    mlp = GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.bfloat16, progress=False).block[1].mlp
    t, indices, weights = routed(mlp, 1, seed, torch.bfloat16)
    calls: list[int] = []
    one = cpu_mxfp4.experts_one_token

    def counted(*args: object, **kwargs: bool) -> torch.Tensor:
        calls.append(1)
        return one(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cpu_mxfp4, "experts_one_token", counted)
    got = experts_fused(mlp, t, indices, weights)
    assert calls == [1]
    assert torch.equal(got, experts_grouped(mlp, t, indices, weights, linear=ex._fused_linear))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", list(FAST))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_equal_reference(checkpoints: dict[str, Path], impl: str, dtype: torch.dtype) -> None:
    """Both fast paths on CUDA weights against the reference on the same weights on the CPU."""
    cpu = GptOss.from_checkpoint(checkpoints["hf"], dtype=dtype, progress=False).block[1].mlp
    cuda = GptOss.from_checkpoint(checkpoints["hf"], device="cuda", dtype=dtype, progress=False).block[1].mlp
    t, indices, weights = routed(cpu, 37, 5, dtype)
    expected = experts_reference(cpu, t, indices, weights).float()
    got = FAST[impl](cuda, t.cuda(), indices.cuda(), weights.cuda()).float().cpu()
    tol = 1e-5 if dtype == torch.float32 else 2e-2 * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)


def test_a_bfloat16_model_keeps_its_experts_in_row_pairs_for_the_fused_kernel_only(
    checkpoints: dict[str, Path],
) -> None:
    """A bfloat16 model on a CPU whose fused kernel multiplies bfloat16 natively lays its packed experts out
    in row pairs at load; a float32 model keeps the checkpoint's layout. Every other reader sees the
    checkpoint's layout (:meth:`MXFP4Weight.natural_blocks`), and kernels that do not read pairs get the
    blocks back in it."""
    if not cpu_mxfp4.native_bf16():
        pytest.fail("this machine has AVX512-BF16: the kernel's native bfloat16 path must build")
    plain = GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.float32, progress=False)
    model = GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.bfloat16, progress=False)
    pairs = [
        (getattr(a.mlp, name), getattr(b.mlp, name))
        for a, b in zip(plain.block, model.block, strict=True)
        for name in ("mlp1_weight", "mlp2_weight")
    ]
    for natural, paired in pairs:
        assert not natural.paired
        assert paired.paired
        assert torch.equal(paired.blocks, pair_rows(natural.blocks))
        assert torch.equal(paired.natural_blocks(), natural.blocks)
        assert torch.equal(paired.natural_blocks(1), natural.blocks[1])
        assert torch.equal(paired.expert(1, torch.float32), natural.expert(1, torch.float32))
    model.use_kernels(Kernels(model.block[0].attn.attention, experts_reference))
    for natural, back in pairs:
        assert not back.paired
        assert torch.equal(back.blocks, natural.blocks)


def test_each_device_gets_its_experts_path() -> None:
    expected_cpu = experts_fused if cpu_mxfp4.available() else experts_grouped
    assert Kernels.for_device("cpu").experts is expected_cpu
    assert Kernels.for_device("cuda").experts is experts_batched


def test_expert_spans_and_groups() -> None:
    spans = ex._spans([2, 0, 1, 0, 0, 5, 1])
    assert spans == [(0, 0, 2), (2, 2, 3), (5, 3, 8), (6, 8, 9)]
    assert ex._groups(spans, 3) == [[(0, 0, 2), (2, 2, 3)], [(5, 3, 8)], [(6, 8, 9)]]
    assert ex._groups(spans, 9) == [spans]
    assert ex._groups(spans, 1) == [[span] for span in spans]
    assert ex._spans([0, 0]) == []
    assert ex._groups([], 4) == []


def test_swiglu_clamps_and_interleaves() -> None:
    h = torch.tensor([[10.0, -10.0, 1.0, 2.0]])  # (gate, up) pairs: (10, -10), (1, 2)
    out = swiglu(h, alpha=1.702, limit=7.0)
    expected = [
        7.0 * torch.sigmoid(torch.tensor(1.702 * 7.0)) * (-7.0 + 1),
        torch.sigmoid(torch.tensor(1.702)) * 3,
    ]
    torch.testing.assert_close(out[0], torch.stack(expected))
