"""Decode attention in Triton over the paged KV cache: blocks read through the block table, no gathered
copy.

One new query token per sequence (a decode step). The grid is (sequence, KV head, split): the query heads
that share a KV head are processed together, so each key and value is read once per KV head, and a long
context is split across programs whose partial softmax states :func:`_merge` combines. gpt-oss's learned sink
of each head is one more logit in the softmax denominator with no value: it enters only in the merge, as the
running maximum's floor and one more term of the sum. A sliding-window layer reads only the blocks its window
reaches: the loop bounds start at the window, so released blocks (-1 in the table) are never touched.

Twin: :func:`decode_attention_reference`, the plain per-sequence, per-head softmax over the same cache and
table, compared in tests under the Triton interpreter on a CPU and on a GPU where there is one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.batch import AttentionMetadata, LayerKV
from model.kernels.attention import Attention


@triton.jit
def _split(
    q_ptr,  # [B, H, D]
    k_ptr,  # [slots, KVH, D]
    v_ptr,  # [slots, KVH, D]
    tables_ptr,  # [B, W] int: column c holds the block of positions starts[b] + c * BLOCK ..
    starts_ptr,  # [B] int: the position column 0 starts at, a multiple of BLOCK
    lens_ptr,  # [B] int: tokens in the cache, the new one included
    acc_ptr,  # [B, H, SPLITS, D] float32 partial outputs (unnormalised)
    max_ptr,  # [B, H, SPLITS] float32 running maxima
    sum_ptr,  # [B, H, SPLITS] float32 sums of exp(score - max)
    table_stride,
    starts_stride,
    scale,
    window,  # 0: full attention
    H: tl.constexpr,
    KVH: tl.constexpr,
    D: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head, a power of two
    BLOCK: tl.constexpr,  # tokens per cache block
    SPLITS: tl.constexpr,
) -> None:
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lens_ptr + seq)
    column_zero = tl.load(starts_ptr + seq * starts_stride) // BLOCK
    first = tl.where(window > 0, tl.maximum(length - window, 0), 0)
    # Whole blocks per split, so a block is read by one program only.
    first_block = first // BLOCK
    blocks = tl.cdiv(length, BLOCK) - first_block
    per_split = tl.cdiv(blocks, SPLITS)
    lo = first_block + split * per_split
    hi = tl.minimum(lo + per_split, first_block + blocks)

    heads = kv_head * GROUP + tl.arange(0, GROUP)
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + (seq * H + heads)[:, None] * D + dims[None, :]).to(tl.float32)  # [GROUP, D]
    running_max = tl.full([GROUP], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([GROUP], dtype=tl.float32)
    acc = tl.zeros([GROUP, D], dtype=tl.float32)
    offsets = tl.arange(0, BLOCK)
    for block in range(lo, hi):
        physical = tl.load(tables_ptr + seq.to(tl.int64) * table_stride + block - column_zero).to(tl.int64)
        positions = block * BLOCK + offsets
        valid = (positions >= first) & (positions < length)
        slots = physical * BLOCK + offsets
        kv_offsets = (slots[:, None] * KVH + kv_head) * D + dims[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=valid[:, None], other=0.0).to(tl.float32)  # [BLOCK, D]
        v = tl.load(v_ptr + kv_offsets, mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP, BLOCK]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        # A split that has seen no key yet keeps -inf; exp(-inf - -inf) would be NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp(scores - safe_max[:, None])
        correction = tl.exp(running_max - safe_max)
        running_sum = running_sum * correction + tl.sum(probs, axis=1)
        acc = acc * correction[:, None] + tl.sum(probs[:, :, None] * v[None, :, :], axis=1)
        running_max = new_max
    state = (seq * H + heads) * SPLITS + split
    tl.store(acc_ptr + state[:, None] * D + dims[None, :], acc)
    tl.store(max_ptr + state, running_max)
    tl.store(sum_ptr + state, running_sum)


@triton.jit
def _merge(
    acc_ptr,
    max_ptr,
    sum_ptr,
    sinks_ptr,  # [H] float32 sink logits
    out_ptr,  # [B, H, D]
    H: tl.constexpr,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
) -> None:
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS)
    state = (seq * H + head) * SPLITS + splits
    maxima = tl.load(max_ptr + state)
    sums = tl.load(sum_ptr + state)
    sink = tl.load(sinks_ptr + head).to(tl.float32)
    # The sink is a logit too: it bounds the maximum from below, so a split that saw no key weighs exp(-inf).
    top = tl.maximum(tl.max(maxima, axis=0), sink)
    weights = tl.exp(maxima - top)
    total = tl.sum(sums * weights, axis=0) + tl.exp(sink - top)
    dims = tl.arange(0, D)
    acc = tl.load(acc_ptr + state[:, None] * D + dims[None, :])
    out = tl.sum(acc * weights[:, None], axis=0) / total
    tl.store(out_ptr + (seq * H + head) * D + dims, out.to(out_ptr.dtype.element_ty))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    starts: torch.Tensor,
    context_lens: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    window: int,
    block_size: int,
    splits: int = 4,
) -> torch.Tensor:
    """Attention of one query token per sequence, `q [B, H, D]`, over the paged cache `k_cache`/`v_cache`
    `[slots, KVH, D]` (slot = block * block_size + offset) through `block_tables [B, W]`, whose column c holds
    the block of positions ``starts[b] + c * block_size ..`` (`starts` a multiple of the block size: 0 for a
    table from position 0, later where a window's table begins); the new token's key and value are already
    stored, and `context_lens [B]` counts them. Columns outside the query's reach are never read. `window` 0
    is full attention. Returns `[B, H, D]` in `q`'s dtype; `splits` (a power of two) programs share each
    sequence's context."""
    seqs, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    for name, value in (("query heads per KV head", group), ("head_dim", dim), ("block_size", block_size)):
        if value & (value - 1) or value < 1:
            raise ValueError(f"{name} must be a power of two for the Triton decode attention, got {value}")
    if group * kv_heads != heads or splits & (splits - 1):
        raise ValueError(f"{heads} query heads on {kv_heads} KV heads, {splits} splits: not supported")
    q = q.contiguous()
    acc = torch.empty(seqs, heads, splits, dim, dtype=torch.float32, device=q.device)
    maxima = torch.empty(seqs, heads, splits, dtype=torch.float32, device=q.device)
    sums = torch.empty_like(maxima)
    _split[(seqs, kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        starts,
        context_lens,
        acc,
        maxima,
        sums,
        block_tables.stride(0),
        starts.stride(0),
        scale,
        window,
        heads,
        kv_heads,
        dim,
        group,
        block_size,
        splits,
    )
    out = torch.empty_like(q)
    _merge[(seqs, heads)](acc, maxima, sums, sinks, out, heads, dim, splits)
    return out


class TritonAttention:
    """The attention seam's implementation for GPUs: a decode step (one new token per sequence, with a cache)
    stores its keys and values with one ``index_copy_`` each and attends through :func:`decode_attention`,
    reading the blocks where they lie; prompts and chunks go to `fallback` (the torch path).

    The kernel reads column c of a sequence's table as the block of positions ``starts + c * block_size``,
    ``starts`` being the position of its first slot: the engine's paged cache and the contiguous cache hand
    their blocks in that order (a cache handing them out of order needs the fallback)."""

    def __init__(self, fallback: Attention, splits: int = 4) -> None:
        self.fallback = fallback
        self.splits = splits

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        kv: LayerKV | None,
        sinks: torch.Tensor,
        scale: float,
        window: int,
    ) -> torch.Tensor:
        if kv is None or max(meta.query_lens) > 1:  # host-side lengths: no device sync to decide
            return self.fallback(q, k, v, meta, kv, sinks, scale, window)
        tables = kv.tables
        kv.k.index_copy_(0, tables.slot_mapping, k.to(kv.k.dtype))
        kv.v.index_copy_(0, tables.slot_mapping, v.to(kv.v.dtype))
        out = decode_attention(
            q,
            kv.k,
            kv.v,
            tables.block_index,
            tables.key_positions[:, 0],
            meta.positions + 1,  # one token per sequence: its position + 1 is the sequence's length
            sinks,
            scale,
            window,
            tables.block_size,
            self.splits,
        )
        return out.reshape(q.shape[0], -1)


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    starts: torch.Tensor,
    context_lens: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    window: int,
    block_size: int,
) -> torch.Tensor:
    """Plain twin of :func:`decode_attention`: per sequence, gather the keys its query sees, position by
    position through the table, and per head a softmax with the sink as one more logit."""
    heads = q.shape[1]
    group = heads // k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for s in range(q.shape[0]):
        length, column_zero = int(context_lens[s]), int(starts[s]) // block_size
        first = max(length - window, 0) if window else 0
        slots = [
            int(block_tables[s, p // block_size - column_zero]) * block_size + p % block_size
            for p in range(first, length)
        ]
        keys, values = k_cache[slots].float(), v_cache[slots].float()
        for h in range(heads):
            logits = keys[:, h // group] @ q[s, h].float() * scale
            probs = torch.softmax(torch.cat((logits, sinks[h].float().reshape(1))), dim=0)[:-1]
            out[s, h] = probs @ values[:, h // group]
    return out.to(q.dtype)
