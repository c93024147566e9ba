"""The Triton decode MoE against its plain twin, and its MXFP4 decoding against the format's reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from model.gpt_oss import GptOss, MLPBlock
from model.kernels.experts import experts_reference
from model.kernels.mxfp4 import dequantize_reference, quantize
from model.kernels.triton_moe import (
    DECODE_MAX_TOKENS,
    _mxfp4_rows_dot,
    experts_triton,
    moe_decode,
    moe_reference,
)

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


@pytest.fixture(scope="module", params=["packed", "dequantized"])
def mlp(request: pytest.FixtureRequest, checkpoints: dict[str, Path]) -> MLPBlock:
    model = GptOss.from_checkpoint(
        checkpoints["hf"], device=DEVICE, dtype=torch.float32, expert_mode=request.param, progress=False
    )
    return model.block[1].mlp


@pytest.mark.parametrize("num_tokens", [1, 5, DECODE_MAX_TOKENS + 1])
def test_at_the_seam_decodes_take_the_kernels_and_prompts_the_batched_path(
    mlp: MLPBlock, num_tokens: int
) -> None:
    """The Triton experts on the model's own MoE block against the reference: decode-sized steps on packed
    weights through the kernels, larger steps and dequantized weights through the batched matmuls."""
    t = torch.randn(num_tokens, mlp.mlp2_bias.shape[1], generator=torch.Generator().manual_seed(num_tokens))
    t = t.to(DEVICE)
    indices, weights = mlp.route(t)
    expected = experts_reference(mlp, t, indices, weights)
    torch.testing.assert_close(experts_triton(mlp, t, indices, weights), expected, rtol=1e-5, atol=1e-4)
