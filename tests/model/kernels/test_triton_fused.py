"""The fused decode-layer kernels against their plain twins, and a model built with them against the same
model without them.

Tolerances: in float32 the kernels and twins differ only in summation order, a few float32 ulps over sums of
64-128 products (1e-5). In bfloat16 every output is rounded once, at its store; the twin rounds with torch
(to nearest) and, under Triton's interpreter, the kernel truncates, so an output may differ by one bf16 ulp
(2^-7 relative); the normalized activations the projections read carry the same one-ulp difference, which
the products average down, hence the small absolute term.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model.batch import AttentionMetadata
from model.gpt_oss import ContiguousKVCache, GptOss, RotaryEmbedding
from model.kernels import Kernels
from model.kernels.fused_reference import (
    norm_qkv_rope_reference,
    norm_qkv_rope_store_reference,
    out_residual_reference,
    route_reference,
)
from model.kernels.triton_fused import MAX_TOKENS, norm_qkv_rope, norm_qkv_rope_store, out_residual, route
from tests.triton_interpreter import bf16_dots_widened

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HEADS, KV_HEADS, DIM, HIDDEN, EPS = 4, 2, 32, 96, 1e-5
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2**-7, "atol": 2e-2}}
# Row counts: 1 and 3 (multiply-adds), 16, 33 and the largest step (tl.dot, with masked rows).
ROWS = [1, 3, 16, 33, MAX_TOKENS]


@pytest.fixture(autouse=True)
def _bf16_dot_in_the_interpreter() -> Iterator[None]:
    """The interpreter's bf16 dots widened to float32 (exact), as the GPU's tensor cores compute them, so the
    kernels' own code is what is tested (:mod:`tests.triton_interpreter`)."""
    with bf16_dots_widened():
        yield


def _draw(seed: int, *shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator)).to(dtype).to(DEVICE)


def _rope_tables(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[rows, DIM/2]` of positions far apart, with a YaRN-like concentration above 1."""
    positions = torch.arange(rows, dtype=torch.float32)[:, None] * 37.0
    angles = positions * torch.logspace(0, -3, DIM // 2)[None, :]
    return (1.2 * angles.cos()).to(DEVICE), (1.2 * angles.sin()).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ROWS)
def test_norm_qkv_rope_matches_its_twin(rows: int, dtype: torch.dtype) -> None:
    x = _draw(rows, rows, HIDDEN, scale=3.0, dtype=dtype)
    scale = 1.0 + _draw(1, HIDDEN, scale=0.1)
    weight = _draw(2, (HEADS + 2 * KV_HEADS) * DIM, HIDDEN, scale=HIDDEN**-0.5, dtype=dtype)
    bias = _draw(3, weight.shape[0], scale=0.5, dtype=dtype)
    args = (x, scale, EPS, weight, bias, *_rope_tables(rows), HEADS, KV_HEADS)
    got, expected = norm_qkv_rope(*args), norm_qkv_rope_reference(*args)
    for name, g, e, heads in zip("qkv", got, expected, (HEADS, KV_HEADS, KV_HEADS), strict=True):
        assert g.shape == e.shape == (rows, heads, DIM), name
        assert g.dtype == dtype, name
        assert g.is_contiguous(), name
        torch.testing.assert_close(g, e, **TOLERANCE[dtype], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    ("dtype", "cache_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
)
@pytest.mark.parametrize("rows", [1, 3, 33])
def test_norm_qkv_rope_store_writes_k_and_v_into_their_slots(
    rows: int, dtype: torch.dtype, cache_dtype: torch.dtype
) -> None:
    """The cache a view of a wider one (its heads and slots strided), the slots shuffled, the last of a
    longer step negative (not stored), the cache's other slots left as they were; a bf16 step into a float32 cache holds
    the bf16 values, as the seam's store casts them."""
    x = _draw(rows, rows, HIDDEN, scale=3.0, dtype=dtype)
    scale = 1.0 + _draw(1, HIDDEN, scale=0.1)
    weight = _draw(2, (HEADS + 2 * KV_HEADS) * DIM, HIDDEN, scale=HIDDEN**-0.5, dtype=dtype)
    bias = _draw(3, weight.shape[0], scale=0.5, dtype=dtype)
    slots = torch.randperm(2 * rows + 3, generator=torch.Generator().manual_seed(rows))[:rows].to(DEVICE)
    slots[-1] = -1 if rows > 1 else slots[-1]
    caches = [_draw(seed, 2 * rows + 3, KV_HEADS + 1, DIM, dtype=cache_dtype) for seed in (4, 5)]
    got_caches = [c.clone()[:, :KV_HEADS] for c in caches]
    expected_caches = [c.clone()[:, :KV_HEADS] for c in caches]
    args = (x, scale, EPS, weight, bias, *_rope_tables(rows), HEADS, KV_HEADS)
    q = norm_qkv_rope_store(*args, *got_caches, slots)
    expected_q = norm_qkv_rope_store_reference(*args, *expected_caches, slots)
    assert q.shape == (rows, HEADS, DIM)
    assert q.dtype == dtype
    torch.testing.assert_close(q, expected_q, **TOLERANCE[dtype])
    assert torch.equal(q, norm_qkv_rope(*args)[0])
    for got, expected in zip(got_caches, expected_caches, strict=True):
        torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
        untouched = torch.ones(got.shape[0], dtype=torch.bool, device=DEVICE)
        untouched[slots[slots >= 0]] = False
        assert torch.equal(got[untouched], expected[untouched])
    if cache_dtype != dtype:  # the stored values are the step's dtype's, widened
        stored = got_caches[0][slots[slots >= 0]]
        assert torch.equal(stored, stored.to(dtype).to(cache_dtype))


def test_the_twins_are_the_models_own_ops(model_fp32: GptOss) -> None:
    """The twins compute what the blocks' plain forwards do: RMSNorm, the QKV projection, the half-split
    rotation of q and k; the output projection and residual; the MLP's norm and routing."""
    attn, mlp = model_fp32.block[1].attn, model_fp32.block[1].mlp
    hidden = model_fp32.config.hidden_size
    x = _draw(8, 5, hidden, scale=2.0).cpu()
    cos, sin = model_fp32.rope.cos_sin(torch.tensor([0, 3, 17, 40, 41]))
    qkv = attn.qkv(attn.norm(x)).split([attn.heads * attn.head_dim, *[attn.kv_heads * attn.head_dim] * 2], -1)
    expected = (
        RotaryEmbedding.rotate(qkv[0].unflatten(-1, (attn.heads, -1)), cos, sin),
        RotaryEmbedding.rotate(qkv[1].unflatten(-1, (attn.kv_heads, -1)), cos, sin),
        qkv[2].unflatten(-1, (attn.kv_heads, -1)),
    )
    got = norm_qkv_rope_reference(
        x, attn.norm.scale, attn.norm.eps, attn.qkv.weight, attn.qkv.bias, cos, sin, attn.heads, attn.kv_heads
    )
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    a = _draw(9, 5, attn.heads * attn.head_dim).cpu()
    torch.testing.assert_close(
        out_residual_reference(a, attn.out.weight, attn.out.bias, x), x + attn.out(a), rtol=1e-5, atol=1e-5
    )
    t, indices, weights = route_reference(x, mlp.norm.scale, mlp.norm.eps, mlp.gate.weight, mlp.gate.bias, 4)
    torch.testing.assert_close(t, mlp.norm(x))
    plain_indices, plain_weights = mlp.route(mlp.norm(x))
    assert torch.equal(indices, plain_indices)
    torch.testing.assert_close(weights, plain_weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ROWS)
def test_out_residual_matches_its_twin(rows: int, dtype: torch.dtype) -> None:
    a = _draw(rows, rows, HEADS * DIM, dtype=dtype)
    weight = _draw(2, HIDDEN, HEADS * DIM, scale=(HEADS * DIM) ** -0.5, dtype=dtype)
    bias = _draw(3, HIDDEN, scale=0.5, dtype=dtype)
    x = _draw(4, rows, HIDDEN, scale=2.0, dtype=dtype)
    got = out_residual(a, weight, bias, x)
    assert got.shape == x.shape
    assert got.dtype == dtype
    torch.testing.assert_close(got, out_residual_reference(a, weight, bias, x), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("rows", "experts", "top_k"), [(1, 32, 4), (5, 32, 4), (MAX_TOKENS, 8, 4), (3, 6, 2)]
)
def test_route_matches_its_twin(rows: int, experts: int, top_k: int, dtype: torch.dtype) -> None:
    x = _draw(rows, rows, HIDDEN, scale=3.0, dtype=dtype)
    scale = 1.0 + _draw(1, HIDDEN, scale=0.1)
    weight = _draw(2, experts, HIDDEN, scale=HIDDEN**-0.5, dtype=dtype)
    bias = _draw(3, experts, scale=0.5, dtype=dtype)
    t, indices, weights = route(x, scale, EPS, weight, bias, top_k)
    t_ref, indices_ref, weights_ref = route_reference(x, scale, EPS, weight, bias, top_k)
    torch.testing.assert_close(t, t_ref, **TOLERANCE[dtype])
    assert indices.dtype == torch.int64
    assert torch.equal(indices, indices_ref)
    torch.testing.assert_close(weights, weights_ref, **TOLERANCE[dtype])
    torch.testing.assert_close(weights.float().sum(-1), torch.ones(rows, device=DEVICE), rtol=0, atol=2e-2)


def test_route_breaks_ties_towards_the_lower_expert() -> None:
    """Experts 5 and 2 have the same router row and the largest bias: both chosen, 2 first, equal weights."""
    x = _draw(0, 4, HIDDEN)
    weight = _draw(2, 8, HIDDEN, scale=HIDDEN**-0.5)
    weight[5] = weight[2]
    bias = torch.zeros(8, device=DEVICE)
    bias[[2, 5]] = 50.0
    _, indices, weights = route(x, torch.ones(HIDDEN, device=DEVICE), EPS, weight, bias, 4)
    assert indices[:, :2].tolist() == [[2, 5]] * 4
    assert torch.equal(weights[:, 0], weights[:, 1])


def test_more_rows_than_a_decode_step_are_refused() -> None:
    x = torch.zeros(MAX_TOKENS + 1, HIDDEN, device=DEVICE)
    with pytest.raises(ValueError, match="1 to 64 rows"):
        out_residual(x, torch.zeros(HIDDEN, HIDDEN, device=DEVICE), torch.zeros(HIDDEN, device=DEVICE), x)


def test_the_fused_mlp_block_is_the_blocks_forward(checkpoints: dict[str, Path]) -> None:
    """The MLP block through the fused layers (norm and routing in one launch, the residual in the experts'
    last kernel) against its own forward without them, in float32: a decode step's rows, and a block whose
    experts are another implementation (the reference), which the fused layer follows by the add."""
    from model.kernels.experts import experts_reference
    from model.kernels.triton_fused import TritonFusedLayers

    model = GptOss.from_checkpoint(
        checkpoints["hf"], device=DEVICE, dtype=torch.float32, kernels=Kernels.triton(), progress=False
    )
    mlp = model.block[1].mlp
    x = _draw(21, 3, model.config.hidden_size, scale=2.0)
    fused = TritonFusedLayers()
    for experts in (mlp.experts, experts_reference):
        mlp.experts, mlp.fused = experts, None
        expected = mlp(x)
        got = fused.mlp(mlp, x, None)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# -- the whole model ---------------------------------------------------------------------------------------------


def _decode_logits(model: GptOss, ids: torch.Tensor, prompts: list[int], steps: int) -> list[torch.Tensor]:
    """Logits of the prompts (one step), then of `steps` decode steps of every sequence at once, feeding
    back tokens of the prompts."""
    cache = ContiguousKVCache(model.config, len(prompts), 64, dtype=model.dtype, device=DEVICE)
    slots = list(range(len(prompts)))
    starts = [0, *torch.tensor(prompts).cumsum(0).tolist()]
    first = torch.cat([ids[s : s + n] for s, n in zip(starts, prompts, strict=False)])
    meta = AttentionMetadata.build(prompts, cache_slots=slots, device=DEVICE)
    out = [model(first, meta, cache).float()]
    for step in range(steps):
        tokens = ids[[s - 1 - step for s in starts[1:]]]
        context = [n + step + 1 for n in prompts]
        meta = AttentionMetadata.build([1] * len(prompts), context, cache_slots=slots, device=DEVICE)
        out.append(model(tokens, meta, cache).float())
    return out


def test_a_model_with_the_fused_layers_decodes_as_without(checkpoints: dict[str, Path]) -> None:
    """Prompts past the 16-token window on the sliding layers (together past the fused kernels' rows, so
    they run unfused in both), then decode steps of three sequences: the fused layers (the default of
    Kernels.triton) give the unfused Triton path's logits, in float32. In bf16 the two paths round at
    different places, and a router logit near a tie may pick another expert, which no tolerance describes:
    the kernels are held to their twins above, and gpu_bench compares the bf16 step on the GPU."""
    model = GptOss.from_checkpoint(
        checkpoints["hf"], device=DEVICE, dtype=torch.float32, kernels=Kernels.triton(), progress=False
    )
    assert model.block[0].attn.fused is not None
    ids = torch.randint(1, 1000, (80,), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    prompts = [9, 26, 33]
    got = _decode_logits(model, ids, prompts, steps=2)
    model.use_kernels(Kernels.triton(fused=False))
    assert model.block[0].attn.fused is None
    expected = _decode_logits(model, ids, prompts, steps=2)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
