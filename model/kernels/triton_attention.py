"""Attention in Triton over the paged KV cache: blocks read through the block table where they lie, no
gathered copy; gpt-oss's learned sinks and sliding window included.

* :func:`store_kv` writes a step's new keys and values into their slots, both in one launch.
* :func:`decode_attention`, one new query token per sequence (a decode step). The grid is (sequence, KV head,
  split): the query heads that share a KV head are processed together, so each key and value is read once
  per KV head, and a long context is split across programs whose partial softmax states :func:`_merge`
  combines. The sink enters only in the merge, as the running maximum's floor and one more term of the sum.
  Given arrival counters, the merge runs in the split launch instead: the last split of a (sequence, KV
  head) to finish, counted by an atomic, merges them all in split order, so the result does not depend on
  which split that was.
* :func:`varlen_attention`, any number of queries per sequence in one launch: decodes, prompts, and chunks
  after cached tokens (chunked prefill, prefix-cache hits). One program per (sequence, query tile, KV head),
  the tile holding the GQA group's heads of consecutive query tokens as the rows of a ``tl.dot``; causal by
  the key loop's upper bound, the sink as the online softmax's starting state, float32 accumulation. The
  grid is the host-known bound ``T // tile + S``; each program finds its sequence by bisection over the
  device-side query starts and spare programs return.

In both, a sliding-window layer reads only the blocks its window reaches: the key loop starts at the window,
so released blocks (-1 in the table) are never touched. :class:`TritonAttention` says which step takes which.

The store stays a launch of its own rather than a prologue of the attention: a query tile reads the keys of
its chunk's earlier tiles, which other programs of the same launch would be writing, and a launch has no
ordering between its programs. A fused decode layer (:mod:`model.kernels.triton_fused`) stores a decode
step's keys and values from its QKV kernel instead, and attends through :meth:`TritonAttention.decode`.

Twins: :func:`decode_attention_reference` and :func:`varlen_attention_reference`, plain per-query, per-head
softmaxes over the same cache and tables, compared in tests under the Triton interpreter on a CPU and on a GPU
where there is one.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from model.batch import AttentionMetadata, LayerKV
from model.kernels.attention import Attention


@triton.jit
def _store_kv(
    k_ptr,  # [T, KVH, D] new keys (any strides but the last)
    v_ptr,  # [T, KVH, D] new values
    k_cache_ptr,  # [slots, KVH, D]
    v_cache_ptr,
    slots_ptr,  # [T] int: each token's slot, < 0 for none
    tokens,
    k_stride_t,
    k_stride_h,
    v_stride_t,
    v_stride_h,
    cache_stride_slot,
    cache_stride_head,
    KVH: tl.constexpr,
    D: tl.constexpr,
    ROW: tl.constexpr,  # KVH * D rounded up to a power of two
    BLOCK_T: tl.constexpr,
) -> None:
    token = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    element = tl.arange(0, ROW)
    head, dim = element // D, element % D
    present = token < tokens
    slot = tl.load(slots_ptr + token, mask=present, other=-1).to(tl.int64)
    mask = ((slot >= 0) & present)[:, None] & (element < KVH * D)[None, :]
    token = token.to(tl.int64)
    into = slot[:, None] * cache_stride_slot + head[None, :] * cache_stride_head + dim[None, :]
    k = tl.load(k_ptr + token[:, None] * k_stride_t + head[None, :] * k_stride_h + dim[None, :], mask=mask)
    tl.store(k_cache_ptr + into, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + token[:, None] * v_stride_t + head[None, :] * v_stride_h + dim[None, :], mask=mask)
    tl.store(v_cache_ptr + into, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tokens: int = 16,
) -> None:
    """Write the new keys and values `k`, `v` ``[T, KVH, D]`` into `k_cache`/`v_cache` ``[slots, KVH, D]``
    at ``slot_mapping [T]`` (a negative slot: not stored), both in one launch, cast to the cache's dtype.
    Plain twin: two ``index_copy_``."""
    tokens, kv_heads, dim = k.shape
    if tokens == 0:
        return
    if k.stride(2) != 1 or v.stride(2) != 1:
        k, v = k.contiguous(), v.contiguous()
    assert k_cache.stride(2) == 1, "the cache's head dimension is contiguous"
    assert k_cache.stride() == v_cache.stride(), "keys and values share one layout"
    _store_kv[(triton.cdiv(tokens, block_tokens),)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        tokens,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        kv_heads,
        dim,
        triton.next_power_of_2(kv_heads * dim),
        block_tokens,
    )


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
    sinks_ptr,  # [H] float32 sink logits, read when MERGE
    out_ptr,  # [B, H, D], written when MERGE
    arrivals_ptr,  # [B, KVH] int32 zeros, used (and left zero) when MERGE
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
    MERGE: tl.constexpr,  # the last split of a (sequence, KV head) to finish merges them all
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
    if MERGE:
        # Which split finishes last varies from launch to launch; the merge it runs reads every split's
        # state from memory in split order, so the result does not: the counter only elects the merger.
        tl.debug_barrier()  # every thread of this program has stored its part before the arrival counts
        counter = arrivals_ptr + seq * KVH + kv_head
        # acq_rel at GPU scope: the states stored before the other splits' arrivals are visible to the last.
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
            _merge_heads(acc_ptr, max_ptr, sum_ptr, sinks_ptr, out_ptr, seq, heads, H, D, SPLITS)
            tl.store(counter, 0)  # zero again for the next launch (a graph's replay reuses the counters)


@triton.jit
def _merge_heads(
    acc_ptr,
    max_ptr,
    sum_ptr,
    sinks_ptr,
    out_ptr,
    seq,
    heads,
    H: tl.constexpr,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
):
    """Merge the split states of sequence `seq`'s query `heads` with their sinks into ``out [B, H, D]``.
    The loads bypass L1 (``.cg``): the states were stored by other programs, maybe on other SMs."""
    splits = tl.arange(0, SPLITS)
    state = (seq * H + heads)[:, None] * SPLITS + splits[None, :]  # [heads, SPLITS]
    maxima = tl.load(max_ptr + state, cache_modifier=".cg")
    sums = tl.load(sum_ptr + state, cache_modifier=".cg")
    sink = tl.load(sinks_ptr + heads).to(tl.float32)
    # The sink is a logit too: it bounds the maximum from below, so a split that saw no key weighs exp(-inf).
    top = tl.maximum(tl.max(maxima, axis=1), sink)
    weights = tl.exp(maxima - top[:, None])
    total = tl.sum(sums * weights, axis=1) + tl.exp(sink - top)
    dims = tl.arange(0, D)
    acc = tl.load(acc_ptr + state[:, :, None] * D + dims[None, None, :], cache_modifier=".cg")
    out = tl.sum(acc * weights[:, :, None], axis=1) / total[:, None]
    rows = (seq * H + heads)[:, None] * D + dims[None, :]
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty))


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
    head = tl.program_id(1) + tl.arange(0, 1)
    _merge_heads(acc_ptr, max_ptr, sum_ptr, sinks_ptr, out_ptr, seq, head, H, D, SPLITS)


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
    arrivals: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence, `q [B, H, D]`, over the paged cache `k_cache`/`v_cache`
    `[slots, KVH, D]` (slot = block * block_size + offset) through `block_tables [B, W]`, whose column c holds
    the block of positions ``starts[b] + c * block_size ..`` (`starts` a multiple of the block size: 0 for a
    table from position 0, later where a window's table begins); the new token's key and value are already
    stored, and `context_lens [B]` counts them. Columns outside the query's reach are never read. `window` 0
    is full attention. Returns `[B, H, D]` in `q`'s dtype; `splits` (a power of two) programs share each
    sequence's context.

    The splits' states are merged by a second launch, or, given `arrivals` (int32 zeros, at least B · KVH of
    them, left zero), in the same launch by the last split of each (sequence, KV head) to finish: the same
    sums in the same order, one launch fewer."""
    seqs, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    for name, value in (("query heads per KV head", group), ("head_dim", dim), ("block_size", block_size)):
        if value & (value - 1) or value < 1:
            raise ValueError(f"{name} must be a power of two for the Triton decode attention, got {value}")
    if group * kv_heads != heads or splits & (splits - 1):
        raise ValueError(f"{heads} query heads on {kv_heads} KV heads, {splits} splits: not supported")
    if arrivals is not None and (arrivals.dtype != torch.int32 or arrivals.numel() < seqs * kv_heads):
        raise ValueError(f"arrivals: {arrivals.numel()} {arrivals.dtype}, not int32 for {seqs} x {kv_heads}")
    q = q.contiguous()
    acc = torch.empty(seqs, heads, splits, dim, dtype=torch.float32, device=q.device)
    maxima = torch.empty(seqs, heads, splits, dtype=torch.float32, device=q.device)
    sums = torch.empty_like(maxima)
    out = torch.empty_like(q)
    merge = arrivals is not None
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
        sinks,
        out,
        arrivals if merge else maxima,  # not read without the merge
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
        merge,
    )
    if not merge:
        _merge[(seqs, heads)](acc, maxima, sums, sinks, out, heads, dim, splits)
    return out


@triton.jit
def _varlen(
    q_ptr,  # [T, H, D] the step's queries, the sequences' tokens one after another
    k_ptr,  # [slots, KVH, D]
    v_ptr,
    out_ptr,  # [T, H, D]
    tables_ptr,  # [S, W] int: column c holds the block of positions starts[s] + c * BLOCK ..
    starts_ptr,  # [S] int: the position column 0 starts at, a multiple of BLOCK
    query_starts_ptr,  # [S + 1] int: sequence s's queries are rows query_starts[s] .. query_starts[s + 1] - 1
    lens_ptr,  # [S] int: tokens in the cache once this step's are stored (its queries are the last ones)
    sinks_ptr,  # [H] sink logits
    num_seqs,
    search_steps,  # at least log2(num_seqs)
    q_stride_t,
    q_stride_h,
    out_stride_t,
    out_stride_h,
    table_stride,
    starts_stride,
    k_stride_slot,
    k_stride_head,
    v_stride_slot,
    v_stride_head,
    scale_log2,  # the softmax scale times log2(e): scores are kept in base 2
    window,  # 0: full attention
    GROUP: tl.constexpr,  # query heads per KV head
    D: tl.constexpr,
    BLOCK: tl.constexpr,  # tokens per cache block
    BLOCK_M: tl.constexpr,  # rows of a query tile: BLOCK_Q tokens x GROUP heads (then padding)
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,  # keys per step of the loop
    PRECISION: tl.constexpr,  # tl.dot's input precision ("ieee" keeps float32 exact)
) -> None:
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    # Sequence s owns tiles first_tile(s) = query_starts[s] // BLOCK_Q + s onwards (a strictly increasing
    # bound, room for its ceil(len / BLOCK_Q) tiles); this tile's sequence is the last s with
    # first_tile(s) <= tile, found by bisection.
    lo = 0
    hi = num_seqs
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        below = tl.load(query_starts_ptr + mid) // BLOCK_Q + mid <= tile
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    seq = lo
    q_start = tl.load(query_starts_ptr + seq)
    q_len = tl.load(query_starts_ptr + seq + 1) - q_start
    local = tile - (q_start // BLOCK_Q + seq)
    if local * BLOCK_Q >= q_len:  # a spare tile of the grid's host-known bound
        return
    length = tl.load(lens_ptr + seq)
    column_zero = tl.load(starts_ptr + seq * starts_stride) // BLOCK
    table = tables_ptr + seq.to(tl.int64) * table_stride

    rows = tl.arange(0, BLOCK_M)
    token = local * BLOCK_Q + rows // GROUP  # index among the sequence's queries
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (token < q_len)
    row = (q_start + token).to(tl.int64)
    query_pos = length - q_len + token
    dims = tl.arange(0, D)
    q = tl.load(
        q_ptr + row[:, None] * q_stride_t + head[:, None] * q_stride_h + dims[None, :],
        mask=row_valid[:, None],
        other=0.0,
    ).to(k_ptr.dtype.element_ty)  # a dot's operands share a dtype
    # The sink is one more logit with no value: the running state starts from it (maximum = sink, sum =
    # exp(0) = 1); a head without one (-inf) starts empty.
    sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
    running_max = sink
    running_sum = tl.where(sink == float("-inf"), 0.0, 1.0)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    # Causal and windowed by the loop's bounds: from the oldest key the tile's first query may see to the
    # tile's last query. Keys below a window never load, nor do their released blocks.
    tile_first = length - q_len + local * BLOCK_Q
    key_end = tl.minimum(tile_first + BLOCK_Q, length)
    key_start = tl.where(window > 0, tl.maximum(tile_first - window + 1, 0), 0)
    offsets = tl.arange(0, BLOCK_N)
    for start in range(key_start, key_end, BLOCK_N):
        key_pos = start + offsets
        key_valid = key_pos < key_end
        physical = tl.load(table + key_pos // BLOCK - column_zero, mask=key_valid, other=0).to(tl.int64)
        slot = physical * BLOCK + key_pos % BLOCK
        k = tl.load(
            k_ptr + slot[:, None] * k_stride_slot + kv_head * k_stride_head + dims[None, :],
            mask=key_valid[:, None],
            other=0.0,
        )
        v = tl.load(
            v_ptr + slot[:, None] * v_stride_slot + kv_head * v_stride_head + dims[None, :],
            mask=key_valid[:, None],
            other=0.0,
        )
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        seen = key_valid[None, :] & (key_pos[None, :] <= query_pos[:, None])
        seen &= (window == 0) | (key_pos[None, :] > query_pos[:, None] - window)
        scores = tl.where(seen, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        # A row that has seen neither a key nor a sink keeps -inf; exp(-inf - -inf) would be NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp2(scores - safe_max[:, None])
        correction = tl.exp2(running_max - safe_max)
        running_sum = running_sum * correction + tl.sum(probs, axis=1)
        acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        running_max = new_max
    # Every real row has seen its own key; a padding row may have seen nothing.
    out = acc / tl.where(running_sum == 0.0, 1.0, running_sum)[:, None]
    tl.store(
        out_ptr + row[:, None] * out_stride_t + head[:, None] * out_stride_h + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None],
    )


def varlen_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    starts: torch.Tensor,
    query_starts: torch.Tensor,
    context_lens: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    window: int,
    block_size: int,
    max_query_len: int,
    *,
    block_m: int = 128,
    block_n: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:
    """Attention of every query of a step, `q [T, H, D]`, sequence s's queries being rows
    ``query_starts[s] .. query_starts[s + 1] - 1`` (``query_starts [S + 1]``) at the last positions of its
    ``context_lens[s]`` tokens, over the paged cache `k_cache`/`v_cache` ``[slots, KVH, D]`` through
    `block_tables` and `starts` as in :func:`decode_attention`; the queries' own keys are already stored.
    Decodes (one query), prompts and chunks after cached tokens (prefix hits, chunked prefill) alike.
    `max_query_len` (host-known) bounds the query tile: ``block_m`` rows at most, each tile holding
    ``block_m // group`` tokens with all the group's heads. Returns ``[T, H, D]`` in `q`'s dtype."""
    tokens, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    if group * kv_heads != heads or dim & (dim - 1) or dim < 16:
        raise ValueError(f"{heads} query heads on {kv_heads} KV heads of {dim}: not supported")
    # The tile: the group's heads of as many tokens as fit, no taller than the longest query needs.
    rows = max(16, min(block_m, triton.next_power_of_2(max_query_len * group)))
    if group > rows:
        raise ValueError(f"{group} query heads per KV head do not fit a {rows}-row tile")
    per_tile = rows // group
    seqs = query_starts.shape[0] - 1
    if q.stride(2) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    _varlen[(tokens // per_tile + seqs, kv_heads)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        starts,
        query_starts,
        context_lens,
        sinks,
        seqs,
        seqs.bit_length(),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        starts.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        scale * math.log2(math.e),
        window,
        group,
        dim,
        block_size,
        rows,
        per_tile,
        max(16, block_n),
        "ieee" if k_cache.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    return out


class TritonAttention:
    """The attention seam's implementation for GPUs: the new keys and values stored by :func:`store_kv` (one
    launch), then one attention launch per layer.

    * A decode-only step (one new token per sequence, the host-side ``meta.query_lens`` say so without a
      device sync) goes through :func:`decode_attention`, split over the context. One query per sequence
      gives :func:`varlen_attention` one tile per (sequence, KV head): 8 programs at batch 1 for a GPU of 132
      SMs, each reading the whole context alone, where the split kernel puts `splits` programs on each; and
      the decode graphs capture this path, whose grid does not depend on the lengths.
    * Any other step (prompts, chunks after cached tokens, and the decodes that share their step) goes
      through one :func:`varlen_attention` launch: the chunks' tiles fill the GPU, a decode row costs one
      tile, and one launch needs no host-side split of the rows. Its per-sequence query starts and lengths
      are derived on the device from the metadata's per-token tensors, once per forward.
    * Without a cache (each sequence attends to its own tokens) the step's keys and values are read in
      place, as a cache of one-token blocks whose tables are each sequence's rows.

    ``benchmarks/gpu_bench.py`` (section ``prefill_attention``) times both kernels on decode-only batches
    of short and long contexts, which is what this choice rests on, and the varlen kernel against the torch
    path on prompts and chunks.

    The kernels read column c of a sequence's table as the block of positions ``starts + c * block_size``,
    ``starts`` being the position of its first slot: the engine's paged cache and the contiguous cache hand
    their blocks in that order; a cache handing them out of order would need `fallback` (the torch path,
    whose masks go by each slot's position), which otherwise serves only shapes the kernels do not take (a
    head size or query heads per KV head that is not a power of two)."""

    def __init__(
        self,
        fallback: Attention,
        splits: int = 4,
        *,
        block_m: int = 128,
        block_n: int = 64,
        num_warps: int = 4,
    ) -> None:
        self.fallback = fallback
        self.splits = splits
        self.block_m = block_m
        self.block_n = block_n
        self.num_warps = num_warps

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
        if not self.takes(q.shape[1], k.shape[1], q.shape[2]):
            return self.fallback(q, k, v, meta, kv, sinks, scale, window)
        if kv is None:
            query_starts, lengths = step_rows(meta)
            width = max(meta.query_lens)
            tables = query_starts[:-1, None] + torch.arange(width, device=q.device)
            zero = torch.zeros(meta.num_seqs, dtype=torch.int64, device=q.device)
            out = self._varlen(q, k, v, tables, zero, query_starts, lengths, sinks, scale, window, 1, meta)
            return out.reshape(q.shape[0], -1)
        tables = kv.tables
        store_kv(k, v, kv.k, kv.v, tables.slot_mapping)
        starts = tables.key_positions[:, 0]  # the tables' first slot is a real one: its position
        if max(meta.query_lens) == 1:  # host-side lengths: no device sync to decide
            return self.decode(q, meta, kv, sinks, scale, window)
        query_starts, lengths = step_rows(meta)
        out = self._varlen(
            q, kv.k, kv.v, tables.block_index, starts, query_starts, lengths, sinks, scale, window,
            tables.block_size, meta,
        )  # fmt: skip
        return out.reshape(q.shape[0], -1)

    def takes(self, heads: int, kv_heads: int, dim: int) -> bool:
        """Whether the kernels take a layer of `heads` query heads on `kv_heads` of `dim` (else `fallback`
        serves it)."""
        group = heads // kv_heads
        return _power_of_two(group) and _power_of_two(dim) and dim >= 16 and group <= self.block_m

    def decode(
        self,
        q: torch.Tensor,
        meta: AttentionMetadata,
        kv: LayerKV,
        sinks: torch.Tensor,
        scale: float,
        window: int,
        arrivals: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention `[T, heads · D]` of a decode step (one query per sequence) whose keys and values
        are already in `kv` (stored by :meth:`__call__`, or by a fused layer's QKV kernel), through
        :func:`decode_attention`: with `arrivals` its merge is folded into the split launch."""
        tables = kv.tables
        out = decode_attention(
            q,
            kv.k,
            kv.v,
            tables.block_index,
            tables.key_positions[:, 0],  # the tables' first slot is a real one: its position
            decode_lengths(meta),
            sinks,
            scale,
            window,
            tables.block_size,
            self.splits,
            arrivals,
        )
        return out.reshape(q.shape[0], -1)

    def _varlen(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        tables: torch.Tensor,
        starts: torch.Tensor,
        query_starts: torch.Tensor,
        lengths: torch.Tensor,
        sinks: torch.Tensor,
        scale: float,
        window: int,
        block_size: int,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return varlen_attention(
            q,
            k_cache,
            v_cache,
            tables,
            starts,
            query_starts,
            lengths,
            sinks,
            scale,
            window,
            block_size,
            max(meta.query_lens),
            block_m=self.block_m,
            block_n=self.block_n,
            num_warps=self.num_warps,
        )


def decode_lengths(meta: AttentionMetadata) -> torch.Tensor:
    """Per sequence of a decode step (one token each), its length once the step is stored: its position + 1,
    on the device, computed by the first layer and reused by the others (one launch per forward, not per
    layer)."""
    cached = meta.attention_plans.get(("triton", "decode_lengths"))
    if isinstance(cached, torch.Tensor):
        return cached
    lengths = meta.positions + 1
    meta.attention_plans[("triton", "decode_lengths")] = lengths
    return lengths


def step_rows(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence, where its queries start among the step's rows (``[S + 1]``, the last entry the row
    count) and its length once the step is stored (``[S]``), both on the device, derived there from the
    metadata's per-token tensors (a copy of the host lists would wait on the host), once per forward."""
    cached = meta.attention_plans.get(("triton", "rows"))
    if isinstance(cached, tuple):
        return cached
    tokens = meta.positions.shape[0]
    device = meta.positions.device
    # Every token of sequence s gives the same row (and position) of s's first query.
    first_row = torch.arange(tokens, device=device) - meta.query_offset
    first_pos = meta.positions - meta.query_offset
    query_starts = torch.full((meta.num_seqs + 1,), tokens, dtype=torch.int64, device=device)
    query_starts[:-1].scatter_(0, meta.seq_index, first_row)
    lengths = torch.empty(meta.num_seqs, dtype=torch.int64, device=device)
    lengths.scatter_(0, meta.seq_index, first_pos)
    lengths += query_starts[1:] - query_starts[:-1]
    meta.attention_plans[("triton", "rows")] = (query_starts, lengths)
    return query_starts, lengths


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


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


def varlen_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    starts: torch.Tensor,
    query_starts: torch.Tensor,
    context_lens: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    window: int,
    block_size: int,
) -> torch.Tensor:
    """Plain twin of :func:`varlen_attention`: query by query, the keys its position sees gathered position
    by position through the table, and per head a softmax with the sink as one more logit."""
    heads = q.shape[1]
    group = heads // k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    # Host lists: reading a GPU tensor's entries one by one would wait on the device each time.
    tables, bounds = block_tables.tolist(), query_starts.tolist()
    for s, (length, start) in enumerate(zip(context_lens.tolist(), starts.tolist(), strict=True)):
        first_row, end_row = bounds[s], bounds[s + 1]
        column_zero = start // block_size
        for row in range(first_row, end_row):
            position = length - (end_row - row)
            oldest = max(position - window + 1, 0) if window else 0
            slots = [
                tables[s][p // block_size - column_zero] * block_size + p % block_size
                for p in range(oldest, position + 1)
            ]
            keys, values = k_cache[slots].float(), v_cache[slots].float()
            for h in range(heads):
                logits = keys[:, h // group] @ q[row, h].float() * scale
                probs = torch.softmax(torch.cat((logits, sinks[h].float().reshape(1))), dim=0)[:-1]
                out[row, h] = probs @ values[:, h // group]
    return out.to(q.dtype)
