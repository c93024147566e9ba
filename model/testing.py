"""Random inputs shared by the tests and the benchmarks (so that both exercise the same shapes the same way).
Nothing in the server imports this module."""

from __future__ import annotations

import torch

from model.gpt_oss import AttentionMetadata, KVView


def random_attention_case(
    seed: int, q_lens: list[int], ctx_lens: list[int], heads: int = 4, kv_heads: int = 2, dim: int = 16
) -> tuple[torch.Tensor, KVView, AttentionMetadata, torch.Tensor]:
    """Queries, a KV view, metadata and sinks for sequences that add `q_lens[s]` tokens ending at
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
