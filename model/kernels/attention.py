"""Attention with learned sinks and an optional sliding window, at the KV cache's seam: store, then attend.

An implementation (:class:`Attention`) gets a layer's new queries, keys and values, the forward's
:class:`~model.batch.AttentionMetadata` and the layer's cache (:class:`~model.batch.LayerKV`: its slot arrays
and the step's block tables), writes the new keys and values into their slots and attends over what each
sequence's tables say it reads. Without a cache, each sequence attends to its own tokens of this forward.

Query at position p sees the keys at positions k with k <= p and, on sliding layers, p - window < k. Each
head's learned sink is one extra logit in the softmax denominator whose probability is dropped.

* :func:`attention_reference` — the spec: slot by slot, one sequence and one query head at a time.
* :class:`TorchAttention` — the torch fast path: ``index_copy_`` into the slots, a gather of each sequence's
  whole blocks into a padded copy, and a few padded fused calls (:func:`attention_plan`) with the sinks
  added by :func:`sdpa_sink_from_lse` (the CPU) or :func:`sdpa_sink_as_key` (elsewhere). The copy lives
  here only: a paged kernel reads the blocks through the tables where they lie.

:func:`fused_attention` is a fused layer's attention block around this seam, shared by the CPU's and the
GPU's fused layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from model.batch import AttentionMetadata, KVCache, LayerKV

if TYPE_CHECKING:
    from model.kernels import AttentionWeights


class Attention(Protocol):
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
        """Store `k`, `v` ``[T, kv_heads, head_dim]`` at ``kv.tables.slot_mapping`` (none without `kv`) and
        return the attention of `q` ``[T, heads, head_dim]`` as ``[T, heads · head_dim]``. `sinks` [heads];
        `window` 0 for full attention."""
        ...


@dataclass(slots=True)
class KVView:
    """Per sequence, the keys and values its queries may attend to, padded to a common length.

    ``positions[s, j]`` is the absolute position of ``keys[s, j]``, or -1 for padding. Keys need not start at
    position 0 nor be sorted; the attention mask is derived from these positions alone.
    """

    keys: torch.Tensor  # [S, L, kv_heads, head_dim]
    values: torch.Tensor  # [S, L, kv_heads, head_dim]
    positions: torch.Tensor  # [S, L] int64


# -- a fused layer's attention block around this seam --


def fused_attention(
    block: AttentionWeights,
    x: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    cache: KVCache | None,
    norm_qkv_rope: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    out_residual: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """:meth:`model.kernels.FusedLayers.attention` around this seam: a fused layer's `norm_qkv_rope` (``(x,
    norm scale, eps, qkv weight, qkv bias, cos, sin, heads, kv_heads) -> (q, k, v)``), the block's own
    attention (store into its layer of the cache, attend), then the layer's `out_residual` (``(a, out
    weight, out bias, x) -> x + out(a)``)."""
    norm = block.norm
    q, k, v = norm_qkv_rope(
        x, norm.scale, norm.eps, block.qkv.weight, block.qkv.bias, *cos_sin, block.heads, block.kv_heads
    )
    kv = None if cache is None else cache.layer(block.layer, block.window, meta)
    t = block.attention(q, k, v, meta, kv, block.sinks, block.scale, block.window)
    return out_residual(t, block.out.weight, block.out.bias, x)


# -- the reference --


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    kv: LayerKV | None,
    sinks: torch.Tensor,
    scale: float,
    window: int,
) -> torch.Tensor:
    """Plain twin of :class:`TorchAttention`: the new keys stored slot by slot, each sequence's slots read
    block by block from its table, then :func:`attend_reference`."""
    if kv is None:
        assert meta.query_lens == meta.context_lens, "sequences with earlier tokens need a KV cache"
        width = max(meta.query_lens)
        view = KVView(
            k.new_zeros(meta.num_seqs, width, *k.shape[1:]),
            v.new_zeros(meta.num_seqs, width, *v.shape[1:]),
            torch.full((meta.num_seqs, width), -1, dtype=torch.int64, device=k.device),
        )
        start = 0
        for s, length in enumerate(meta.query_lens):
            view.keys[s, :length] = k[start : start + length]
            view.values[s, :length] = v[start : start + length]
            view.positions[s, :length] = meta.positions[start : start + length]
            start += length
    else:
        for token, slot in enumerate(kv.tables.slot_mapping.tolist()):
            kv.k[slot] = k[token]
            kv.v[slot] = v[token]
        size = kv.tables.block_size
        slots = torch.tensor(
            [[b * size + i for b in row for i in range(size)] for row in kv.tables.block_index.tolist()],
            device=k.device,
        )
        view = KVView(kv.k[slots], kv.v[slots], kv.tables.key_positions)
    return attend_reference(q, view, meta, sinks, scale, window)


def attend_reference(
    q: torch.Tensor, kv: KVView, meta: AttentionMetadata, sinks: torch.Tensor, scale: float, window: int
) -> torch.Tensor:
    """Plain twin of :meth:`TorchAttention.attend`, one sequence and one query head at a time."""
    heads, head_dim = q.shape[1], q.shape[2]
    group = heads // kv.keys.shape[2]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    start = 0
    for s, length in enumerate(meta.query_lens):
        queries = q[start : start + length].float()
        query_pos = meta.positions[start : start + length]
        present = kv.positions[s] >= 0
        keys, values, key_pos = (
            kv.keys[s][present].float(),
            kv.values[s][present].float(),
            kv.positions[s][present],
        )
        allowed = key_pos[None, :] <= query_pos[:, None]
        if window:
            allowed &= key_pos[None, :] > query_pos[:, None] - window
        for h in range(heads):
            logits = queries[:, h] @ keys[:, h // group].T * scale
            logits = logits.masked_fill(~allowed, float("-inf"))
            sink = sinks[h].float().expand(length, 1)
            probs = torch.softmax(torch.cat((logits, sink), dim=-1), dim=-1)[:, :-1]
            out[start : start + length, h] = probs @ values[:, h // group]
        start += length
    return out.reshape(q.shape[0], heads * head_dim).to(q.dtype)


# -- the torch fast path --


# An additive attention mask [S, 1, Lq, L] (0 where allowed, -inf elsewhere), or None for the causal one.
Mask = torch.Tensor | None
# Attention with sinks over padded sequences: (q [S, H, Lq, D], k, v [S, KVH, L, D], mask, sinks, scale).
Sdpa = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Mask, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True, slots=True)
class TorchAttention:
    """Store with ``index_copy_``, gather whole blocks, attend in padded fused calls through `sdpa`."""

    sdpa: Sdpa  # sdpa_sink_from_lse or sdpa_sink_as_key

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
        view = _view_of_fresh_tokens(k, v, meta) if kv is None else store_and_gather(k, v, kv)
        return self.attend(q, view, meta, sinks, scale, window)

    def attend(
        self,
        q: torch.Tensor,
        kv: KVView,
        meta: AttentionMetadata,
        sinks: torch.Tensor,
        scale: float,
        window: int,
    ) -> torch.Tensor:
        """The calls of :func:`attention_plan` over the gathered keys, each padded."""
        calls = attention_plan(meta, kv.positions, window, q.dtype)
        if len(calls) == 1:  # it covers every token
            call = calls[0]
            keys, values = kv.keys[call.seqs], kv.values[call.seqs]
            return _attention_padded(q, keys, values, call, sinks, scale, self.sdpa)
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        for call in calls:
            if isinstance(call.seqs, slice):
                keys, values = kv.keys[call.seqs], kv.values[call.seqs]
            else:
                keys, values = kv.keys.index_select(0, call.seqs), kv.values.index_select(0, call.seqs)
            out[call.tokens] = _attention_padded(q[call.tokens], keys, values, call, sinks, scale, self.sdpa)
        return out


def store_and_gather(k: torch.Tensor, v: torch.Tensor, kv: LayerKV) -> KVView:
    """Write the new keys and values into their slots, then copy each sequence's blocks, whole and in table
    order, into one padded view (each block is one contiguous row of the storage seen as
    ``[blocks, block_size · kv_heads · head_dim]``)."""
    tables = kv.tables
    kv.k.index_copy_(0, tables.slot_mapping, k.to(kv.k.dtype))
    kv.v.index_copy_(0, tables.slot_mapping, v.to(kv.v.dtype))
    index = tables.block_index.view(-1)
    shape = (tables.block_index.shape[0], tables.key_positions.shape[1], *kv.k.shape[1:])
    row = tables.block_size * kv.k.shape[1] * kv.k.shape[2]
    return KVView(
        kv.k.view(-1, row).index_select(0, index).view(shape),
        kv.v.view(-1, row).index_select(0, index).view(shape),
        tables.key_positions,
    )


def _view_of_fresh_tokens(k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> KVView:
    """Without a cache: each sequence attends to its own tokens of this forward."""
    assert meta.query_lens == meta.context_lens, "sequences with earlier tokens need a KV cache"
    width = max(meta.query_lens)
    starts = [0]
    for q in meta.query_lens[:-1]:
        starts.append(starts[-1] + q)
    device = k.device
    offsets = torch.arange(width, device=device)
    lens = torch.tensor(meta.query_lens, device=device)
    valid = offsets[None, :] < lens[:, None]
    index = (torch.tensor(starts, device=device)[:, None] + offsets[None, :]).where(valid, 0)
    positions = (meta.positions[index]).where(valid, -1)
    return KVView(k[index], v[index], positions)


@dataclass(slots=True)
class PaddedCall:
    """One fused attention call of :meth:`TorchAttention.attend`: the sequences and tokens it covers, how many
    key columns it reads, and the mask, all from positions alone, so the same in every layer of a kind."""

    seqs: slice | torch.Tensor  # its sequences: rows of the KV view (a slice when consecutive)
    tokens: slice | torch.Tensor  # its tokens: rows of q
    key_start: int  # the first key column read
    width: int  # key columns read, from key_start
    seq_index: torch.Tensor  # [t] each token's sequence within the call
    query_offset: torch.Tensor  # [t] its index among that sequence's new tokens
    # [s, 1, Lq, width] additive mask: 0 where allowed, -inf elsewhere. None for a causal call: one sequence
    # whose keys are exactly its queries' tokens, in order (a fresh prompt in a full-attention layer), which
    # the fused kernels' causal mode covers without reading a mask.
    bias: torch.Tensor | None


@dataclass(slots=True)
class _Plan:
    """The calls of :func:`attention_plan` for keys at `positions`, memoised on the forward's metadata."""

    positions: torch.Tensor
    calls: list[PaddedCall]


def attention_plan(
    meta: AttentionMetadata, positions: torch.Tensor, window: int, dtype: torch.dtype
) -> list[PaddedCall]:
    """The calls :meth:`TorchAttention.attend` makes for keys at `positions` ([S, L]), memoised on `meta`.

    One padded call pads every sequence to the longest query and the longest key list of the batch, so a
    decode step that shares the batch with a prompt chunk would pay the chunk's length on every decode row.
    The single-token queries (decodes) therefore go in one call, cut to the keys they use, and each longer
    query (a prompt chunk) in a call of its own. Consecutive sequences are taken as slices (the scheduler puts
    running decodes first and new prompts last), so their keys are views, not copies.

    A fresh prompt (no earlier tokens) in a full-attention layer is plainly causal: if its keys are its own
    tokens in order (checked on the positions, since the cache may hand them in any order) its call takes the
    kernels' causal mode and builds no mask. On the CPU that skips the blocks above the diagonal. A long
    query in a sliding-window layer is cut into blocks that read only the keys their window reaches
    (:func:`_windowed_calls`). Both cut most of a long prompt's work: see ``benchmarks/README.md``.
    """
    cached = meta.attention_plans.get(("torch", window, dtype))
    if isinstance(cached, _Plan) and cached.positions is positions:
        return cached.calls
    device = positions.device
    if max(meta.query_lens) == 1 or len(meta.query_lens) == 1:
        groups = [list(range(meta.num_seqs))]
    else:
        decodes = [s for s, length in enumerate(meta.query_lens) if length == 1]
        groups = [decodes] if decodes else []
        groups += [[s] for s, length in enumerate(meta.query_lens) if length > 1]
    starts = [0]
    for length in meta.query_lens:
        starts.append(starts[-1] + length)
    calls = []
    for group in groups:
        if group[-1] - group[0] + 1 == len(group):
            seqs: slice | torch.Tensor = slice(group[0], group[-1] + 1)
            tokens: slice | torch.Tensor = slice(starts[group[0]], starts[group[-1] + 1])
            key_pos = positions[seqs]
            seq_index = meta.seq_index[tokens] - group[0]
        else:
            seqs = torch.tensor(group, device=device)
            tokens = torch.cat([torch.arange(starts[s], starts[s + 1], device=device) for s in group])
            key_pos = positions.index_select(0, seqs)
            lens = torch.tensor([meta.query_lens[s] for s in group], device=device)
            seq_index = torch.repeat_interleave(torch.arange(len(group), device=device), lens)
        width = key_pos.shape[1]
        query_offset = meta.query_offset[tokens]
        if _is_causal(meta, group, tokens, key_pos, window):
            q_len = meta.query_lens[group[0]]
            calls.append(PaddedCall(seqs, tokens, 0, q_len, seq_index, query_offset, None))
            continue
        if window and len(group) == 1 and meta.query_lens[group[0]] > 2 * WINDOW_QUERY_BLOCK:
            token_range = range(starts[group[0]], starts[group[0] + 1])
            calls += _windowed_calls(meta, seqs, token_range, key_pos, window, dtype)
            continue
        if len(groups) > 1:
            # The key columns up to the last one some sequence of the call uses (a host sync, once per call
            # and forward): a slice of the keys; masked columns before it only cost their share of the work.
            width = int((key_pos >= 0).any(0).nonzero().max()) + 1
            key_pos = key_pos[:, :width]
        q_width = max(meta.query_lens[s] for s in group)
        query_pos = torch.full((len(group), q_width), -1, dtype=torch.int64, device=device)
        query_pos[seq_index, query_offset] = meta.positions[tokens]
        bias = _mask(key_pos[:, None, :], query_pos[:, :, None], window, dtype)
        calls.append(PaddedCall(seqs, tokens, 0, width, seq_index, query_offset, bias))
    meta.attention_plans[("torch", window, dtype)] = _Plan(positions, calls)
    return calls


def _mask(key_pos: torch.Tensor, query_pos: torch.Tensor, window: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask `[s, 1, Lq, L]` for keys at `key_pos [s, 1, L]` and queries at `query_pos [s, Lq, 1]`
    (-1: padding): 0 where a query may see a key (not padding, not after it, within `window` if set)."""
    allowed = (key_pos >= 0) & (key_pos <= query_pos)
    if window:
        allowed &= key_pos > query_pos - window
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, float("-inf"))[:, None]


# A long query in a sliding-window layer is cut into blocks of this many tokens, each reading only the keys
# its window reaches.
WINDOW_QUERY_BLOCK = 256


def _windowed_calls(
    meta: AttentionMetadata,
    seqs: slice | torch.Tensor,
    tokens: range,
    key_pos: torch.Tensor,
    window: int,
    dtype: torch.dtype,
) -> list[PaddedCall]:
    """The calls of one sequence's long query (its tokens `tokens`, its keys at `key_pos [1, L]`) in a
    sliding-window layer: one per block of :data:`WINDOW_QUERY_BLOCK` queries, over the key columns from the
    first to the last one its queries may see. A single call reads every key for every query and masks all
    but a window's worth, for a 2048-token prompt and a 128-token window most of the work. The columns come
    from the positions (a host sync per block), so keys in any order stay correct; in order (as the caches
    hand them) each block reads about its own length plus the window."""
    device = key_pos.device
    calls = []
    for lo in range(tokens.start, tokens.stop, WINDOW_QUERY_BLOCK):
        hi = min(lo + WINDOW_QUERY_BLOCK, tokens.stop)
        qp = meta.positions[lo:hi, None]  # [q, 1]
        # Columns some query of the block may see lie within the block's positions, less the window.
        reach = (key_pos[0] >= 0) & (key_pos[0] <= qp.max()) & (key_pos[0] > qp.min() - window)
        used = reach.nonzero()
        first, last = torch.stack((used.min(), used.max())).tolist()
        width = last + 1 - first
        bias = _mask(key_pos[:, None, first : last + 1], qp[None], window, dtype)
        seq_index = torch.zeros(hi - lo, dtype=torch.int64, device=device)
        offsets = torch.arange(hi - lo, device=device)
        calls.append(PaddedCall(seqs, slice(lo, hi), first, width, seq_index, offsets, bias))
    return calls


def _is_causal(
    meta: AttentionMetadata,
    group: list[int],
    tokens: slice | torch.Tensor,
    key_pos: torch.Tensor,
    window: int,
) -> bool:
    """Whether a call's mask is the plain causal one: a full-attention layer, one sequence with no earlier
    tokens and more than one new one, its queries at positions 0, 1, ... and its key columns holding the
    same positions in the same order, then padding only. The last two are one host sync, made only for such
    a prompt, once per forward and kind."""
    if window or len(group) > 1:
        return False
    q_len = meta.query_lens[group[0]]
    if q_len == 1 or q_len != meta.context_lens[group[0]] or key_pos.shape[1] < q_len:
        return False
    expected = torch.arange(key_pos.shape[1], device=key_pos.device)
    keys_in_order = (key_pos[0] == expected.where(expected < q_len, -1)).all()
    return bool(keys_in_order & (meta.positions[tokens] == expected[:q_len]).all())


def _attention_padded(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    call: PaddedCall,
    sinks: torch.Tensor,
    scale: float,
    sdpa: Sdpa,
) -> torch.Tensor:
    """One call's attention with sinks through one fused attention call: queries padded per sequence to
    ``[s, heads, Lq, D]``, keys and values ``[s, L, kv_heads, D]`` cut to the call's width, its mask shared by
    all heads; the sinks are added by `sdpa`."""
    tokens, heads, head_dim = q.shape
    if call.bias is None:  # causal: one sequence, its queries in order, nothing to pad
        padded_q = q[None]
    else:
        seqs, _, q_width, _ = call.bias.shape
        padded_q = q.new_zeros(seqs, q_width, heads, head_dim)
        padded_q[call.seq_index, call.query_offset] = q
    out = sdpa(
        padded_q.transpose(1, 2),
        keys[:, call.key_start : call.key_start + call.width].transpose(1, 2),
        values[:, call.key_start : call.key_start + call.width].transpose(1, 2),
        call.bias,
        sinks,
        scale,
    )  # [s, heads, Lq, D]
    if call.bias is None:
        return out[0].transpose(0, 1).reshape(tokens, heads * head_dim)
    return out.transpose(1, 2)[call.seq_index, call.query_offset].reshape(tokens, heads * head_dim)


def sdpa_sink_as_key(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Mask, sinks: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention `q [S, H, Lq, D]` over `k`, `v` `[S, KVH, L, D]` with the additive `bias [S, 1, Lq, L]`
    (None: causal, Lq = L), each head's sink an extra key in front: its key is zero, so its score is exactly
    its mask value, set to the sink logit; its value is zero, so it only adds to the softmax denominator.
    Costs a copy of the keys, the values and a per-head mask; rows whose every key is masked still come out
    finite."""
    seqs, heads, q_width, _ = q.shape
    if bias is None:  # the extra key shifts the columns, so the causal mask is spelt out
        bias = q.new_zeros(1, 1, q_width, q_width).masked_fill_(
            torch.ones(q_width, q_width, dtype=torch.bool, device=q.device).triu(1), float("-inf")
        )
    sink_bias = sinks.to(q.dtype)[None, :, None, None].expand(seqs, heads, q_width, 1)
    mask = torch.cat((sink_bias, bias.expand(seqs, heads, q_width, bias.shape[-1])), dim=-1)
    zero = k.new_zeros(seqs, k.shape[1], 1, k.shape[3])
    keys = torch.cat((zero, k), dim=2)
    values = torch.cat((zero, v), dim=2)
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=scale, enable_gqa=heads != k.shape[1]
    )


def sdpa_sink_from_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Mask, sinks: torch.Tensor, scale: float
) -> torch.Tensor:
    """:func:`sdpa_sink_as_key` without the extra key, for the CPU: attention over the real keys returns its
    log-sum-exp `lse` per row too, and a sink `s` turns the softmax denominator `Z = e^lse` into `Z + e^s`,
    so every output row is scaled by `Z / (Z + e^s) = sigmoid(lse - s)`. The mask stays one `[Lq, L]` per
    sequence (a 2048-token prompt chunk of 8 heads built a 134 MB float32 mask per layer the other way) and
    the keys and values are not copied again. Rows whose every key is masked may come out NaN (the caller
    drops them: they are padding).

    Grouped query heads (H = group x KVH): with one query per sequence (decodes) the group's heads become the
    query rows of their key head, `[S, KVH, group, D]`, the mask broadcast over them, so the keys and values
    are not repeated per head; longer queries repeat the keys and values, smaller than the mask that folding
    would repeat."""
    seqs, heads, q_width, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if group > 1 and q_width == 1:
        out, lse = flash(q.reshape(seqs, kv_heads, group, dim), k, v, attn_mask=bias, scale=scale)
        out, lse = out.reshape(seqs, heads, 1, dim), lse.reshape(seqs, heads, 1)
    else:
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        out, lse = flash(q, k, v, is_causal=bias is None, attn_mask=bias, scale=scale)
    return out * torch.sigmoid(lse - sinks[None, :, None]).unsqueeze(-1).to(out.dtype)


# The CPU's fused attention kernel (a private aten op) returns the log-sum-exp that sdpa_sink_from_lse needs.
HAS_CPU_FLASH_LSE = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
