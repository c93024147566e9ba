"""The CPU's fused decode layer (model.kernels.cpu_fused) against its twins and the model's plain blocks: each
call alone, the paged attention over shuffled blocks, and whole decode steps of a bfloat16 model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model.batch import AttentionMetadata, BlockTables, LayerKV
from model.gpt_oss import ContiguousKVCache, GptOss
from model.kernels import Kernels, cpu_fused, cpu_mxfp4
from model.kernels.attention import TorchAttention, attention_reference, sdpa_sink_from_lse
from model.kernels.cpu_fused import (
    MAX_TOKENS,
    CpuAttention,
    CpuFusedLayers,
    norm_qkv_rope,
    out_residual,
    paged_attention,
    route,
)
from model.kernels.experts import experts_fused
from model.kernels.fused_reference import norm_qkv_rope_reference, out_residual_reference, route_reference
from model.make_checkpoint import write_checkpoint
from tests.model.conftest import SEED, SMALL_WINDOW

HEADS, KV_HEADS, DIM, HIDDEN, EPS = 8, 2, 64, 96, 1e-5
# The twins round once where the fused calls round as the plain blocks do (twice for q and k): a bfloat16 ulp
# or two apart.
BF16 = {"rtol": 2**-7, "atol": 2e-2}
ROWS = [1, 2, 5, MAX_TOKENS]


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if not cpu_mxfp4.native_bf16():
        pytest.fail("this machine has AVX512-BF16: the fused decode layer must build")


def _draw(seed: int, *shape: int, scale: float = 1.0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def _rope_tables(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(rows, dtype=torch.float32)[:, None] * 37.0
    angles = positions * torch.logspace(0, -3, DIM // 2)[None, :]
    return 1.2 * angles.cos(), 1.2 * angles.sin()


@pytest.mark.parametrize("rows", ROWS)
def test_norm_qkv_rope_matches_its_twin(rows: int) -> None:
    x = _draw(rows, rows, HIDDEN, scale=3.0)
    scale = 1.0 + _draw(1, HIDDEN, scale=0.1, dtype=torch.float32)
    weight = _draw(2, (HEADS + 2 * KV_HEADS) * DIM, HIDDEN, scale=HIDDEN**-0.5)
    bias = _draw(3, weight.shape[0], scale=0.5)
    args = (x, scale, EPS, weight, bias, *_rope_tables(rows), HEADS, KV_HEADS)
    got, expected = norm_qkv_rope(*args), norm_qkv_rope_reference(*args)
    for name, g, e, heads in zip("qkv", got, expected, (HEADS, KV_HEADS, KV_HEADS), strict=True):
        assert g.shape == e.shape == (rows, heads, DIM), name
        assert g.dtype == torch.bfloat16, name
        torch.testing.assert_close(g, e, **BF16, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("rows", ROWS)
def test_out_residual_is_the_plain_blocks_sum_bit_for_bit(rows: int) -> None:
    """The same GEMV and the same two roundings (the projection, then the residual sum) as ``x + out(a)``."""
    a = _draw(rows, rows, HEADS * DIM)
    weight = _draw(2, HIDDEN, HEADS * DIM, scale=(HEADS * DIM) ** -0.5)
    bias = _draw(3, HIDDEN, scale=0.5)
    x = _draw(4, rows, HIDDEN, scale=2.0)
    got = out_residual(a, weight, bias, x)
    plain = x + cpu_mxfp4.bf16_gemv(a, weight, bias, torch.empty(rows, HIDDEN, dtype=torch.bfloat16))
    assert torch.equal(got, plain)
    torch.testing.assert_close(got, out_residual_reference(a, weight, bias, x), **BF16)


@pytest.mark.parametrize(
    ("rows", "experts", "top_k"), [(1, 32, 4), (5, 32, 4), (MAX_TOKENS, 8, 4), (3, 6, 2)]
)
def test_route_matches_its_twin(rows: int, experts: int, top_k: int) -> None:
    x = _draw(rows, rows, HIDDEN, scale=3.0)
    scale = 1.0 + _draw(1, HIDDEN, scale=0.1, dtype=torch.float32)
    weight = _draw(2, experts, HIDDEN, scale=HIDDEN**-0.5)
    bias = _draw(3, experts, scale=0.5)
    t, indices, weights = route(x, scale, EPS, weight, bias, top_k)
    t_ref, indices_ref, weights_ref = route_reference(x, scale, EPS, weight, bias, top_k)
    torch.testing.assert_close(t, t_ref, **BF16)
    assert indices.dtype == torch.int64
    assert torch.equal(indices, indices_ref)
    torch.testing.assert_close(weights, weights_ref, **BF16)


def test_route_breaks_ties_towards_the_lower_expert() -> None:
    x = _draw(0, 4, HIDDEN)
    weight = _draw(2, 8, HIDDEN, scale=HIDDEN**-0.5)
    weight[5] = weight[2]
    bias = torch.zeros(8, dtype=torch.bfloat16)
    bias[[2, 5]] = 50.0
    _, indices, weights = route(x, torch.ones(HIDDEN), EPS, weight, bias, 4)
    assert indices[:, :2].tolist() == [[2, 5]] * 4
    assert torch.equal(weights[:, 0], weights[:, 1])


def test_more_rows_than_the_gemv_takes_are_refused() -> None:
    x = torch.zeros(MAX_TOKENS + 1, HIDDEN, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"1 to {MAX_TOKENS} rows"):
        out_residual(x, torch.zeros(HIDDEN, HIDDEN, dtype=torch.bfloat16), None, x)


# -- the paged attention -----------------------------------------------------------------------------------------


def _paged_step(
    query_lens: list[int],
    context_lens: list[int],
    block_size: int,
    seed: int,
    shape: tuple[int, int, int] = (HEADS, KV_HEADS, DIM),
) -> tuple[AttentionMetadata, LayerKV, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A cache of shuffled blocks already holding every sequence's earlier keys and values, the tables of a
    step adding `query_lens` tokens, and the step's new q, k, v; `shape` is (heads, kv_heads, head_dim)."""
    heads, kv_heads, dim = shape
    g = torch.Generator().manual_seed(seed)
    meta = AttentionMetadata.build(query_lens, context_lens)
    per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(per_seq) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, start = [], 0
    for n in per_seq:
        tables.append(order[start : start + n])
        start += n
    width = max(per_seq)
    block_index = torch.tensor([row + [row[-1]] * (width - len(row)) for row in tables])
    key_positions = torch.full((len(tables), width * block_size), -1, dtype=torch.int64)
    for s, c in enumerate(context_lens):
        key_positions[s, :c] = torch.arange(c)
    slot_mapping = torch.tensor(
        [
            tables[s][p // block_size] * block_size + p % block_size
            for s, p in zip(meta.seq_index.tolist(), meta.positions.tolist(), strict=True)
        ]
    )
    slots = num_blocks * block_size
    kv = LayerKV(
        torch.randn(slots, kv_heads, dim, generator=g).bfloat16(),
        torch.randn(slots, kv_heads, dim, generator=g).bfloat16(),
        BlockTables(slot_mapping, block_index, key_positions, block_size),
    )
    tokens = sum(query_lens)
    q, k, v = (torch.randn(tokens, h, dim, generator=g).bfloat16() for h in (heads, kv_heads, kv_heads))
    return meta, kv, q, k, v


# (heads, kv_heads, head_dim): query heads per key head 4, 8 (gpt-oss), 2 and 16 at each head_dim the vector
# path takes; 3, which takes the plain loop.
SHAPES = [(8, 2, 64), (16, 2, 64), (4, 2, 32), (32, 2, 128), (6, 2, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window", [0, 16])
@pytest.mark.parametrize(
    ("query_lens", "context_lens"),
    [([1], [1]), ([1], [40]), ([1, 1, 1], [3, 70, 17]), ([1, 5, 1], [33, 5, 50]), ([MAX_TOKENS], [80])],
)
def test_paged_attention_matches_the_reference(
    query_lens: list[int], context_lens: list[int], window: int, shape: tuple[int, int, int]
) -> None:
    """Decodes, a chunk after cached tokens and a fresh prompt in one step, over blocks in shuffled order: the
    same stored slots as the reference's store, and its attention with sinks and the window."""
    meta, kv, q, k, v = _paged_step(query_lens, context_lens, 4, seed=len(query_lens) + window, shape=shape)
    heads, _, dim = shape
    sinks = torch.linspace(-2, 2, heads)
    scale = dim**-0.5
    expected_kv = LayerKV(kv.k.clone(), kv.v.clone(), kv.tables)
    expected = attention_reference(q, k, v, meta, expected_kv, sinks, scale, window)
    got = paged_attention(q, k, v, meta, kv, sinks, scale, window)
    assert torch.equal(kv.k, expected_kv.k)
    assert torch.equal(kv.v, expected_kv.v)
    assert got.shape == (sum(query_lens), heads * dim)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=2**-7, atol=1e-2)


def test_paged_attention_refuses_a_slot_outside_the_cache() -> None:
    meta, kv, q, k, v = _paged_step([1], [9], 4, seed=0)
    kv.tables.slot_mapping[0] = kv.k.shape[0]
    with pytest.raises(RuntimeError, match="out of range"):
        paged_attention(q, k, v, meta, kv, torch.zeros(HEADS), 0.125, 0)


def test_the_attention_seam_falls_back_past_its_rows_and_without_a_cache() -> None:
    calls: list[str] = []

    def fallback(*args: object) -> torch.Tensor:
        calls.append("torch")
        return torch.zeros(0)

    seam = CpuAttention(fallback)  # type: ignore[arg-type]
    meta, kv, q, k, v = _paged_step([MAX_TOKENS + 1], [MAX_TOKENS + 1], 4, seed=1)
    seam(q, k, v, meta, kv, torch.zeros(HEADS), 0.125, 0)
    seam(q[:1], k[:1], v[:1], AttentionMetadata.build([1]), None, torch.zeros(HEADS), 0.125, 0)
    assert calls == ["torch", "torch"]


# -- the whole model ---------------------------------------------------------------------------------------------


def _decode_logits(model: GptOss, ids: torch.Tensor, prompts: list[int], steps: int) -> list[torch.Tensor]:
    """Logits of the prompts (one step), then of `steps` decode steps of every sequence at once, feeding
    back tokens of the prompts."""
    cache = ContiguousKVCache(model.config, len(prompts), 64, dtype=model.dtype)
    slots = list(range(len(prompts)))
    starts = [0, *torch.tensor(prompts).cumsum(0).tolist()]
    first = torch.cat([ids[s : s + n] for s, n in zip(starts, prompts, strict=False)])
    out = [model(first, AttentionMetadata.build(prompts, cache_slots=slots), cache).float()]
    for step in range(steps):
        tokens = ids[[s - 1 - step for s in starts[1:]]]
        context = [n + step + 1 for n in prompts]
        meta = AttentionMetadata.build([1] * len(prompts), context, cache_slots=slots)
        out.append(model(tokens, meta, cache).float())
    return out


@pytest.fixture(scope="module")
def every_expert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with each token routed to all its experts. With k of them, bfloat16 router logits a
    rounding apart may swap an expert in or out (which no tolerance describes); with all of them the routing
    weights are a softmax over every logit, as smooth as the rest of the model."""
    config = dataclasses.replace(SMALL_WINDOW, experts_per_token=SMALL_WINDOW.num_experts)
    return write_checkpoint(config, tmp_path_factory.mktemp("every-expert"), layout="hf", seed=SEED)


@pytest.mark.parametrize("prompts", [[9], [9, 26, 33]])
def test_a_bfloat16_model_decodes_with_the_fused_layer_as_without(
    every_expert: Path, prompts: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts past the 16-token window on the sliding layers, then decode steps: the CPU's default kernels
    (the fused layer, its paged attention, the one-call experts at batch 1) give the plain blocks' logits
    over the torch attention, within bfloat16's rounding. The fused calls run in every layer of every
    step of at most MAX_TOKENS rows."""
    model = GptOss.from_checkpoint(every_expert, dtype=torch.bfloat16, progress=False)
    assert isinstance(model.block[0].attn.fused, CpuFusedLayers)
    assert isinstance(model.block[0].attn.attention, CpuAttention)
    calls = {"norm_qkv_rope": 0, "paged_attention": 0, "out_residual": 0, "route": 0}
    for name in calls:

        def counted(*args: object, name: str = name, fn: object = getattr(cpu_fused, name)) -> object:
            calls[name] += 1
            return fn(*args)  # type: ignore[operator]

        monkeypatch.setattr(cpu_fused, name, counted)
    ids = torch.randint(1, 1000, (80,), generator=torch.Generator().manual_seed(5))
    steps = 3
    got = _decode_logits(model, ids, prompts, steps)
    monkeypatch.undo()
    layers = len(model.block)
    fused_steps = steps + (1 if sum(prompts) <= MAX_TOKENS else 0)
    assert calls == dict.fromkeys(calls, layers * fused_steps)
    model.use_kernels(Kernels(TorchAttention(sdpa_sink_from_lse), experts_fused))
    assert model.block[0].attn.fused is None
    expected = _decode_logits(model, ids, prompts, steps)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0.03 * e.abs().max().item())


def test_a_short_prompt_without_a_cache_takes_the_fused_projections_and_the_torch_attention(
    every_expert: Path,
) -> None:
    """No cache (a whole-sequence scoring call): the fused norm, projections and routing with the torch
    attention over the step's own tokens, the plain blocks' logits within bfloat16's rounding."""
    model = GptOss.from_checkpoint(every_expert, dtype=torch.bfloat16, progress=False)
    ids = torch.randint(1, 1000, (MAX_TOKENS,), generator=torch.Generator().manual_seed(6))
    meta = AttentionMetadata.build([MAX_TOKENS])
    got = model(ids, meta, None).float()
    model.use_kernels(Kernels(TorchAttention(sdpa_sink_from_lse), experts_fused))
    expected = model(ids, AttentionMetadata.build([MAX_TOKENS]), None).float()
    torch.testing.assert_close(got, expected, rtol=0, atol=0.03 * expected.abs().max().item())
