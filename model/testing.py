"""Random inputs shared by the tests and the benchmarks (so that both exercise the same shapes the same way).
Nothing in the server imports this module."""

from __future__ import annotations

import math

import torch

from model.batch import AttentionMetadata, BlockTables, LayerKV
from model.config import ModelConfig
from model.gpt_oss import GptOss, RotaryEmbedding
from model.kernels import Kernels
from model.kernels.attention import KVView


def random_attention_case(
    seed: int, q_lens: list[int], ctx_lens: list[int], heads: int = 4, kv_heads: int = 2, dim: int = 16
) -> tuple[torch.Tensor, KVView, AttentionMetadata, torch.Tensor]:
    """Queries, a gathered KV view, metadata and sinks for sequences that add `q_lens[s]` tokens ending at
    `ctx_lens[s]`: every sequence's keys at positions 0.. in order, padded with -1 to the longest context."""
    g = torch.Generator().manual_seed(seed)
    meta = AttentionMetadata.build(q_lens, ctx_lens)
    width = max(ctx_lens)
    q = torch.randn(sum(q_lens), heads, dim, generator=g)
    keys = torch.randn(len(q_lens), width, kv_heads, dim, generator=g)
    values = torch.randn(len(q_lens), width, kv_heads, dim, generator=g)
    positions = torch.arange(width).expand(len(q_lens), width).clone()
    positions[positions >= torch.tensor(ctx_lens)[:, None]] = -1
    sinks = torch.randn(heads, generator=g)
    return q, KVView(keys, values, positions), meta, sinks


def random_paged_case(
    seed: int,
    q_lens: list[int],
    ctx_lens: list[int],
    window: int,
    *,
    block_size: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    dim: int = 16,
    shuffle: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, LayerKV, torch.Tensor]:
    """Queries, new keys and values, metadata, a paged layer cache and sinks: sequences that add `q_lens[s]`
    tokens ending at `ctx_lens[s]`, their earlier keys already in randomly drawn blocks of a random cache.

    The tables are what the engine builds: each sequence reads whole blocks, from the one holding the oldest
    key its first new token's `window` reaches (0: from its first block) to its last, padded by repeating its
    last block; positions past its last token are -1. With `shuffle` each sequence's blocks come in a random
    order (their positions with them), which the masks must not depend on."""
    g = torch.Generator().manual_seed(seed)
    meta = AttentionMetadata.build(q_lens, ctx_lens)
    blocks_of = [-(-c // block_size) for c in ctx_lens]
    pool = torch.randperm(sum(blocks_of) + 3, generator=g).tolist()  # a few blocks nobody owns
    tables = []
    for count in blocks_of:
        tables.append(pool[:count])
        pool = pool[count:]
    num_slots = (sum(blocks_of) + 3) * block_size
    k_cache = torch.randn(num_slots, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_slots, kv_heads, dim, generator=g)
    firsts = [
        (max(0, c - q - window + 1) if window else 0) // block_size
        for q, c in zip(q_lens, ctx_lens, strict=True)
    ]
    width = max(n - f for n, f in zip(blocks_of, firsts, strict=True))
    block_index = torch.zeros(len(q_lens), width, dtype=torch.int64)
    key_positions = torch.full((len(q_lens), width * block_size), -1, dtype=torch.int64)
    for s, (table, first, c) in enumerate(zip(tables, firsts, ctx_lens, strict=True)):
        columns = [min(first + j, len(table) - 1) for j in range(width)]
        if shuffle:
            columns = [columns[j] for j in torch.randperm(width, generator=g).tolist()]
        block_index[s] = torch.tensor([table[j] for j in columns])
        for j, column in enumerate(columns):
            for i in range(block_size):
                p = column * block_size + i
                if p < c and columns.index(column) == j:  # a repeated block is padding
                    key_positions[s, j * block_size + i] = p
    slot_mapping = torch.tensor(
        [
            tables[s][p // block_size] * block_size + p % block_size
            for s, p in zip(meta.seq_index.tolist(), meta.positions.tolist(), strict=True)
        ]
    )
    q = torch.randn(sum(q_lens), heads, dim, generator=g)
    k = torch.randn(sum(q_lens), kv_heads, dim, generator=g)
    v = torch.randn(sum(q_lens), kv_heads, dim, generator=g)
    sinks = torch.randn(heads, generator=g)
    kv = LayerKV(k_cache, v_cache, BlockTables(slot_mapping, block_index, key_positions, block_size))
    return q, k, v, meta, kv, sinks


def random_model(
    config: ModelConfig,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    kernels: Kernels | None = None,
    seed: int = 0,
) -> GptOss:
    """A model of `config`'s shapes with random weights drawn on `device`, in the distributions the checkpoint
    writer uses (unit-variance linear outputs, MXFP4 experts of about 1/sqrt(fan_in) scale): what a GPU
    benchmark runs when writing a checkpoint of real size would take minutes. Not the writer's values."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    kernels = Kernels.for_device(device) if kernels is None else kernels
    with torch.device("meta"):
        model = GptOss(config, attention=kernels.attention, experts=kernels.experts, fused=kernels.fused)
    fp4_rms = math.sqrt(sum(v * v for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)) / 8)

    def draw(name: str, shape: torch.Size) -> torch.Tensor:
        if name.endswith(".blocks"):
            return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8, device=device)
        if name.endswith(".scales"):
            centre = 127 + round(math.log2(1.0 / (math.sqrt(shape[-1] * 32) * fp4_rms)))
            jitter = torch.randint(-1, 2, shape, generator=g, device=device)
            return (centre + jitter).to(torch.uint8)
        if name.endswith(".scale"):
            return 1.0 + 0.1 * torch.randn(shape, generator=g, device=device)
        if name.endswith("sinks"):
            return torch.randn(shape, generator=g, device=device)
        if name.endswith("bias"):
            return 0.1 * torch.randn(shape, generator=g, device=device, dtype=dtype)
        scale = 1.0 if name == "embedding.weight" else 1 / math.sqrt(shape[-1])
        return scale * torch.randn(shape, generator=g, device=device, dtype=dtype)

    model.assign_weights(((n, draw(n, t.shape)) for n, t in model.state_dict().items()), dtype=dtype)
    model.rope = RotaryEmbedding(config, device)
    return model.eval().requires_grad_(False)
