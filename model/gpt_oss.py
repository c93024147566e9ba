"""The gpt-oss transformer, in reading order: RMSNorm, YaRN RoPE, attention with sinks and a sliding window,
the MXFP4 mixture of experts, the blocks, the model.

Module names equal the `original/` checkpoint keys (``block.N.attn.qkv``, ``block.N.mlp.mlp1_weight.blocks``),
so loading is a rename-free assignment.

**Batching.** A forward takes the flattened tokens of several sequences at once (``token_ids [T]``) with an
:class:`AttentionMetadata` describing which tokens belong to which sequence and at which positions. Sequence
``s`` contributes ``query_lens[s]`` consecutive tokens at positions ``context_lens[s] - query_lens[s]`` ..
``context_lens[s] - 1``: a prefill, a chunk of one, or a single decode token are all the same case.

**KV cache.** Attention asks a :class:`KVCache` to store the new keys and values and hand back, per sequence,
the keys it may attend to together with their positions (:class:`KVView`). Masks are computed from positions,
so a cache is free to return only what is needed (a sliding-window layer needs at most the last
``window + query_len - 1`` keys) and to keep its memory in any layout (contiguous rows here; paged blocks in
the engine). Without a cache, every sequence attends to its own tokens of this forward only.

**Twins.** :func:`attention` and the experts (:meth:`MLPBlock.experts`, a loop over active experts, on CPUs;
:meth:`MLPBlock.experts_batched`, a fixed number of launches, on GPUs) are the fast paths;
:func:`attention_reference` and :meth:`MLPBlock.experts_reference` are plain twins, written from the spec and
compared with them in tests.

**CPU weights.** On the CPU, bf16 matrices (the linears and dequantized experts) are reordered once at load
into oneDNN's blocked layout (:mod:`model.kernels.prepacked`); every matmul goes through
:func:`model.kernels.prepacked.linear`, which runs plain weights exactly as ``F.linear`` does.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.kernels import prepacked
from model.kernels.mxfp4 import dequantize, dequantize_reference
from model.weights import CheckpointReader, open_checkpoint

logger = logging.getLogger(__name__)


# -- batching and the KV cache --


@dataclass(slots=True)
class AttentionMetadata:
    """Which of the flattened tokens belong to which sequence, and where they sit in it.

    ``positions`` and ``seq_index``/``query_offset`` live on the model's device; the lengths are plain ints so
    that shaping decisions never wait for the device.
    """

    query_lens: list[int]  # new tokens of each sequence in this forward
    context_lens: list[int]  # tokens of each sequence once this forward is done (cached + new)
    positions: torch.Tensor  # [T] int64: absolute position of every token
    seq_index: torch.Tensor  # [T] int64: which sequence each token belongs to
    query_offset: torch.Tensor  # [T] int64: index of each token among its sequence's new tokens
    # Per sequence: its row in a ContiguousKVCache. Other caches may use it as their own per-sequence handle
    # (e.g. an index into their block tables) or ignore it.
    cache_slots: list[int] | None = None
    # Filled by attention(): its calls and masks, which depend on the positions only, built in the first layer
    # of each kind (window, dtype) and reused by the others. Lives as long as this forward's metadata.
    attention_plans: dict[tuple[int, torch.dtype], tuple[torch.Tensor, list[PaddedCall]]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        assert len(self.query_lens) == len(self.context_lens)
        assert all(0 < q <= c for q, c in zip(self.query_lens, self.context_lens, strict=True))
        assert self.positions.shape == (sum(self.query_lens),)
        assert self.cache_slots is None or len(self.cache_slots) == len(self.query_lens)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int] | None = None,
        *,
        cache_slots: list[int] | None = None,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata for sequences that each add `query_lens[s]` tokens ending at `context_lens[s]` (default:
        no earlier tokens, i.e. a fresh prefill)."""
        context_lens = list(query_lens) if context_lens is None else list(context_lens)
        positions, seq_index, offsets = [], [], []
        for s, (q, c) in enumerate(zip(query_lens, context_lens, strict=True)):
            positions.extend(range(c - q, c))
            seq_index.extend([s] * q)
            offsets.extend(range(q))
        indices = torch.tensor([positions, seq_index, offsets], dtype=torch.int64).to(device)
        return cls(list(query_lens), context_lens, indices[0], indices[1], indices[2], cache_slots)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


@dataclass(slots=True)
class KVView:
    """Per sequence, the keys and values one layer's queries may attend to, padded to a common length.

    ``positions[s, j]`` is the absolute position of ``keys[s, j]``, or -1 for padding. Keys need not start at
    position 0 nor be sorted; the attention mask is derived from these positions alone.
    """

    keys: torch.Tensor  # [S, L, kv_heads, head_dim]
    values: torch.Tensor  # [S, L, kv_heads, head_dim]
    positions: torch.Tensor  # [S, L] int64


class KVCache(Protocol):
    """Storage for past keys and values. The engine's paged cache implements the same method."""

    def store_and_view(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, window: int
    ) -> KVView:
        """Store the new `k`, `v` ([T, kv_heads, head_dim], at `meta.positions`) for `layer`; return what the
        queries of this forward attend to. `window` is the layer's sliding window (0: full attention)."""
        ...


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


class ContiguousKVCache:
    """One contiguous row of `max_len` positions per sequence slot and layer.

    The simple cache for tests, benchmarks and single-request use; the engine's paged cache replaces it. For a
    sliding-window layer it returns only the keys the window can reach, so decode reads O(window) there.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_slots: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_slots, max_len, config.num_key_value_heads, config.head_dim)
        self.max_len = max_len
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        # Index tensors depend only on the metadata and the window: built once per forward, not per layer.
        self._plans: tuple[AttentionMetadata | None, dict[int, tuple[torch.Tensor, ...]]] = (None, {})

    def _plan(self, meta: AttentionMetadata, window: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(slot of each token, slot of each sequence [S, 1], gather index [S, L], key positions [S, L])."""
        if self._plans[0] is not meta:
            self._plans = (meta, {})
        plans = self._plans[1]
        if window not in plans:
            slots = torch.tensor(meta.cache_slots, device=device)
            # Oldest key any new query can see: the window of the first new token, or 0 for full attention.
            firsts = [c - q for q, c in zip(meta.query_lens, meta.context_lens, strict=True)]
            starts = [max(0, f - window + 1) if window else 0 for f in firsts]
            width = max(c - s for c, s in zip(meta.context_lens, starts, strict=True))
            index = torch.tensor(starts, device=device)[:, None] + torch.arange(width, device=device)[None, :]
            valid = index < torch.tensor(meta.context_lens, device=device)[:, None]
            plans[window] = (
                slots[meta.seq_index],
                slots[:, None],
                index.where(valid, 0),
                index.where(valid, -1),
            )
        return plans[window]

    def store_and_view(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, window: int
    ) -> KVView:
        assert meta.cache_slots is not None, "ContiguousKVCache needs AttentionMetadata.cache_slots"
        assert max(meta.context_lens) <= self.max_len, "sequence longer than the cache"
        token_slots, rows, index, positions = self._plan(meta, window, k.device)
        self.k[layer][token_slots, meta.positions] = k
        self.v[layer][token_slots, meta.positions] = v
        return KVView(self.k[layer][rows, index], self.v[layer][rows, index], positions)


# -- the layers --


class Linear(nn.Linear):
    """``nn.Linear`` whose weight may be prepacked for the CPU (:func:`GptOss.prepack_weights`)."""

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return prepacked.linear(x, self.weight, self.bias, out)


class RMSNorm(nn.Module):
    """Scale-only RMSNorm, computed in float32 whatever the activation dtype."""

    def __init__(self, num_features: int, eps: float, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(num_features, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.float()
        t = t * torch.rsqrt(t.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (t * self.scale).to(x.dtype)


def rope_parameters(config: ModelConfig) -> tuple[float, torch.Tensor]:
    """YaRN (arXiv 2309.00071): the attention concentration and per-pair inverse frequencies.

    Pairs rotating slower than `ntk_beta` turns over the original context are interpolated by the scaling
    factor, those faster than `ntk_alpha` turns are kept, with a linear ramp between (NTK-by-parts).
    """
    half = config.head_dim // 2
    freq = config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim)
    if config.rope_scaling_factor <= 1.0:
        return 1.0, 1.0 / freq
    concentration = 0.1 * math.log(config.rope_scaling_factor) + 1.0
    low, high = (
        half * math.log(config.initial_context_length / (beta * 2 * math.pi)) / math.log(config.rope_theta)
        for beta in (config.rope_ntk_beta, config.rope_ntk_alpha)
    )
    ramp = ((torch.arange(half, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    interpolation = 1.0 / (config.rope_scaling_factor * freq)
    extrapolation = 1.0 / freq
    inv_freq = interpolation * ramp + extrapolation * (1 - ramp)
    return concentration, inv_freq


class RotaryEmbedding(nn.Module):
    """Half-split (non-interleaved) rotation: pair j is (x[j], x[j + head_dim/2])."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        concentration, inv_freq = rope_parameters(config)
        self.concentration = concentration
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return angles.cos() * self.concentration, angles.sin() * self.concentration

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, head_dim]; cos, sin [T, head_dim/2]."""
        t = x.float()
        x1, x2 = t.chunk(2, dim=-1)
        cos, sin = cos[:, None, :], sin[:, None, :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def attention_reference(
    q: torch.Tensor, kv: KVView, meta: AttentionMetadata, sinks: torch.Tensor, scale: float, window: int
) -> torch.Tensor:
    """Plain twin of :func:`attention`, one sequence and one query head at a time.

    Query at position p sees the keys at positions k with k <= p and, on sliding layers, p - window < k.
    Each head's learned sink is one extra logit in the softmax denominator whose probability is dropped.
    q [T, heads, head_dim] → [T, heads · head_dim].
    """
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


@dataclass(slots=True)
class PaddedCall:
    """One fused attention call of :func:`attention`: the sequences and tokens it covers, how many key columns
    it reads, and the mask, all from positions alone, so the same in every layer of a kind."""

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


def attention(
    q: torch.Tensor, kv: KVView, meta: AttentionMetadata, sinks: torch.Tensor, scale: float, window: int
) -> torch.Tensor:
    """Batched attention with sinks and sliding window: the calls of :func:`attention_plan`, each padded."""
    calls = attention_plan(meta, kv.positions, window, q.dtype)
    if len(calls) == 1:  # it covers every token
        call = calls[0]
        return _attention_padded(q, kv.keys[call.seqs], kv.values[call.seqs], call, sinks, scale)
    out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
    for call in calls:
        if isinstance(call.seqs, slice):
            keys, values = kv.keys[call.seqs], kv.values[call.seqs]
        else:
            keys, values = kv.keys.index_select(0, call.seqs), kv.values.index_select(0, call.seqs)
        out[call.tokens] = _attention_padded(q[call.tokens], keys, values, call, sinks, scale)
    return out


def attention_plan(
    meta: AttentionMetadata, positions: torch.Tensor, window: int, dtype: torch.dtype
) -> list[PaddedCall]:
    """The calls :func:`attention` makes for keys at `positions` ([S, L]), memoised on `meta`.

    One padded call pads every sequence to the longest query and the longest key list of the batch, so a
    decode step that shares the batch with a prompt chunk would pay the chunk's length on every decode row.
    The single-token queries (decodes) therefore go in one call, cut to the keys they use, and each longer
    query (a prompt chunk) in a call of its own. Consecutive sequences are taken as slices (the scheduler puts
    running decodes first and new prompts last), so their keys are views, not copies.

    A fresh prompt (no earlier tokens) in a full-attention layer is plainly causal: if its keys are its own
    tokens in order (checked on the positions, since the cache may hand them in any order) its call takes the
    kernels' causal mode and builds no mask. On the CPU that skips the blocks above the diagonal. A long
    query in a sliding-window layer is cut into blocks that read only the keys their window reaches
    (:func:`_windowed_calls`). ``python benchmarks/attention_bench.py --repeats 3`` on 7788c28 and on this
    code, back to back (2048-token prompt, 8 query heads on 2, a later layer's call): full attention 140.5
    ms with the mask, 53.0 ms causal; 128-token window 124.3 ms in one masked call, 29.9 ms in blocks.
    """
    cached = meta.attention_plans.get((window, dtype))
    if cached is not None and cached[0] is positions:
        return cached[1]
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
    meta.attention_plans[(window, dtype)] = (positions, calls)
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
) -> torch.Tensor:
    """One call's attention with sinks through one fused attention call: queries padded per sequence to
    ``[s, heads, Lq, D]``, keys and values ``[s, L, kv_heads, D]`` cut to the call's width, its mask shared by
    all heads; the sinks are added by :func:`sdpa_with_sinks`."""
    tokens, heads, head_dim = q.shape
    if call.bias is None:  # causal: one sequence, its queries in order, nothing to pad
        padded_q = q[None]
    else:
        seqs, _, q_width, _ = call.bias.shape
        padded_q = q.new_zeros(seqs, q_width, heads, head_dim)
        padded_q[call.seq_index, call.query_offset] = q
    out = sdpa_with_sinks(
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


# An additive attention mask [S, 1, Lq, L] (0 where allowed, -inf elsewhere), or None for the causal one.
Mask = torch.Tensor | None


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
_HAS_CPU_FLASH_LSE = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def sdpa_with_sinks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Mask, sinks: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention with sinks: from the log-sum-exp on the CPU, where torch has the kernel that returns it, as
    an extra key elsewhere. The two agree to rounding (the tests force each in turn against the reference).
    `bias` None: causal, the keys being the queries' own tokens in order."""
    if q.device.type == "cpu" and _HAS_CPU_FLASH_LSE:
        return sdpa_sink_from_lse(q, k, v, bias, sinks, scale)
    return sdpa_sink_as_key(q, k, v, bias, sinks, scale)


class AttentionBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.window = config.window(layer)
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device)
        self.qkv = Linear(config.hidden_size, config.qkv_size, device=device)
        self.sinks = nn.Parameter(torch.zeros(config.num_attention_heads, device=device))
        self.out = Linear(config.q_size, config.hidden_size, device=device)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cache: KVCache | None,
        reference: bool,
    ) -> torch.Tensor:
        t = self.norm(x)
        q, k, v = self.qkv(t).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1
        )
        q = RotaryEmbedding.rotate(q.unflatten(-1, (self.heads, self.head_dim)), *cos_sin)
        k = RotaryEmbedding.rotate(k.unflatten(-1, (self.kv_heads, self.head_dim)), *cos_sin)
        v = v.unflatten(-1, (self.kv_heads, self.head_dim))
        if cache is None:
            view = _view_of_fresh_tokens(k, v, meta)
        else:
            view = cache.store_and_view(self.layer, k, v, meta, self.window)
        impl = attention_reference if reference else attention
        t = impl(q, view, meta, self.sinks, self.scale, self.window)
        return x + self.out(t)


def swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU over interleaved columns: gate = h[..., ::2], up = h[..., 1::2]."""
    gate, up = h[..., ::2], h[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


class ExpertMode(StrEnum):
    PACKED = "packed"  # MXFP4 in memory; each active expert is dequantized when used
    DEQUANTIZED = "dequantized"  # dequantized once at load, prepacked on the CPU (CPU speed for small models)


class MXFP4Weight(nn.Module):
    """The stacked expert weights of one matmul: `blocks [E, out, in/32, 16]` and `scales [E, out, in/32]`."""

    def __init__(self, experts: int, rows: int, cols: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.register_buffer(
            "blocks", torch.zeros(experts, rows, cols // 32, 16, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "scales", torch.zeros(experts, rows, cols // 32, dtype=torch.uint8, device=device)
        )
        # ExpertMode.DEQUANTIZED: each expert's dense `[out, in]` weight, prepacked where that applies.
        self.dense: list[torch.Tensor] | None = None

    def dequantize_all(self, dtype: torch.dtype, prepack: bool) -> None:
        """Switch to :attr:`ExpertMode.DEQUANTIZED`: keep dense weights and drop the packed bytes.

        One expert at a time, so that the temporaries stay one expert's size. A prepack copies the expert, so
        the next one is dequantized into the same buffer: a fresh buffer per expert, freed after its prepack,
        left glibc's heap full of expert-sized holes (about 2 GB of RSS in the model benchmark).
        """
        self.dense = []
        scratch = None
        for e in range(self.blocks.shape[0]):
            weight = dequantize(self.blocks[e], self.scales[e], dtype, out=scratch)
            if prepack and prepacked.applies(weight):
                self.dense.append(prepacked.prepack(weight))
                scratch = weight
            else:
                self.dense.append(weight)
        self.blocks = self.blocks.new_empty(0)
        self.scales = self.scales.new_empty(0)

    def expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert `e`'s weight `[out, in]` in `dtype`, for :func:`model.kernels.prepacked.linear`."""
        if self.dense is not None:
            assert self.dense[e].dtype == dtype, "dequantized experts are kept in the model's dtype"
            return self.dense[e]
        return dequantize(self.blocks[e], self.scales[e], dtype)

    def experts(self, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
        """The plain weights `[len(ids), out, in]` of experts `ids` in `dtype`, dequantized in one call."""
        if self.dense is not None:
            return torch.stack([prepacked.plain(self.dense[e]) for e in ids]).to(dtype)
        index = torch.tensor(ids, device=self.blocks.device)
        return dequantize(self.blocks[index], self.scales[index], dtype)

    def expert_reference(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert `e`'s plain weight `[out, in]` in `dtype`."""
        if self.dense is not None:
            return prepacked.plain(self.dense[e]).to(dtype)
        return dequantize_reference(self.blocks[e], self.scales[e], dtype)


# MLPBlock.experts: the SwiGLU runs over groups of experts whose first-matmul outputs fit in this many bytes,
# so that its passes stay in the cache (one pass over all the pairs of a long prompt was slower than the
# per-expert loop it replaced).
MOE_GROUP_BYTES = 256 << 10
EXPERTS_PER_CALL = 32  # experts dequantized together by MLPBlock.experts_batched


def _spans(counts: list[int]) -> list[tuple[int, int, int]]:
    """`(i, lo, hi)` for each nonzero `counts[i]`: the rows `lo:hi` that item `i` holds when the items' rows
    are laid end to end in order."""
    spans, lo = [], 0
    for i, count in enumerate(counts):
        if count:
            spans.append((i, lo, lo + count))
            lo += count
    return spans


def _groups(spans: list[tuple[int, int, int]], rows: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive `spans` (from :func:`_spans`) in groups of at most `rows` rows (a longer span alone)."""
    groups: list[list[tuple[int, int, int]]] = []
    for span in spans:
        if groups and span[2] - groups[-1][0][1] <= rows:
            groups[-1].append(span)
        else:
            groups.append([span])
    return groups


class MLPBlock(nn.Module):
    def __init__(self, config: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
        self.top_k = config.experts_per_token
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.norm = RMSNorm(h, config.rms_norm_eps, device)
        self.gate = Linear(h, e, device=device)
        self.mlp1_weight = MXFP4Weight(e, 2 * i, h, device)
        self.mlp1_bias = nn.Parameter(torch.zeros(e, 2 * i, device=device))
        self.mlp2_weight = MXFP4Weight(e, h, i, device)
        self.mlp2_bias = nn.Parameter(torch.zeros(e, h, device=device))

    def route(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts per token and their weights: a softmax over the selected router logits only."""
        top = torch.topk(self.gate(t), k=self.top_k, dim=-1, sorted=True)
        return top.indices, torch.softmax(top.values.float(), dim=-1).to(t.dtype)

    def experts(self, t: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Grouped by expert: each active expert is dequantized once and applied to all its tokens.

        The token-expert pairs are sorted by expert and their inputs gathered once, so each expert reads a
        contiguous slice and writes its matmuls into slices of two shared buffers. The SwiGLU runs once per
        group of experts (:data:`MOE_GROUP_BYTES`), the routing weights and the sum back into tokens once over
        all pairs; the loop itself is the two matmuls of each active expert. Some fifteen small ops per
        expert were run in the loop before. ``python benchmarks/moe_bench.py`` (float32, one thread), run on
        that loop (7788c28) and on this one, alternately, twice: the small preset's MoE layers at 16 tokens
        46.9 / 32.1 ms before, 32.1 / 23.3 ms after; against :meth:`experts_batched` in the same runs (not
        changed), 1.0 / 1.1x before and 1.4 / 1.5x after. Each token's terms are still added in the order of
        their experts (the pairs are sorted stably), and the results came out the same to the bit in float32.
        """
        flat = indices.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.mlp1_bias.shape[0]).tolist()
        token_of = order // self.top_k
        x = t[token_of]
        h = t.new_empty(flat.numel(), self.mlp1_bias.shape[1])
        y = t.new_empty(flat.numel(), t.shape[1])
        rows_per_group = max(1, MOE_GROUP_BYTES // (h.shape[1] * h.element_size()))
        for group in _groups(_spans(counts), rows_per_group):
            start, end = group[0][1], group[-1][2]
            for e, lo, hi in group:
                w, b = self.mlp1_weight.expert(e, t.dtype), self.mlp1_bias[e]
                prepacked.linear(x[lo:hi], w, b, out=h[lo:hi])
            a = swiglu(h[start:end], self.alpha, self.limit)
            for e, lo, hi in group:
                w, b = self.mlp2_weight.expert(e, t.dtype), self.mlp2_bias[e]
                prepacked.linear(a[lo - start : hi - start], w, b, out=y[lo:hi])
        y *= weights.flatten()[order, None]
        return torch.zeros_like(t).index_add_(0, token_of, y)

    def experts_batched(self, t: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The same sums with a fixed number of kernel launches, for GPUs.

        The loop of :meth:`experts` issues its matmuls (and their bias copies) expert by expert, which on a
        GPU takes longer to issue than the work takes to run. Here the active experts' weights are dequantized
        together and their tokens go through two batched matmuls, padded to the busiest expert's count;
        experts are taken `EXPERTS_PER_CALL` at a time so the dequantized weights stay bounded (about 1.6 GB
        in bf16 at gpt-oss widths).
        """
        flat = indices.flatten()
        order = torch.argsort(flat, stable=True)
        sorted_experts = flat[order]
        token_of = order // self.top_k
        weight_of = weights.flatten()[order]
        counts = torch.bincount(flat, minlength=self.mlp1_bias.shape[0])
        # Each assignment's row within its expert's group: its rank among the assignments sorted before it.
        slot = torch.arange(flat.numel(), device=t.device) - (counts.cumsum(0) - counts)[sorted_experts]
        counts_host = counts.tolist()  # the one host sync: which experts are active and the padded width
        active = [e for e, c in enumerate(counts_host) if c]
        out = torch.zeros_like(t)
        for first in range(0, len(active), EXPERTS_PER_CALL):
            chunk = active[first : first + EXPERTS_PER_CALL]
            width = max(counts_host[e] for e in chunk)
            ids = torch.tensor(chunk, device=t.device)
            compact = torch.full_like(counts, -1)
            compact[ids] = torch.arange(len(chunk), device=t.device)
            group = compact[sorted_experts]
            taken = (group >= 0).nonzero().squeeze(1) if len(chunk) < len(active) else None
            g, rows, tok, w = (
                (group, slot, token_of, weight_of)
                if taken is None
                else (group[taken], slot[taken], token_of[taken], weight_of[taken])
            )
            x = t.new_zeros(len(chunk), width, t.shape[1])
            x[g, rows] = t[tok]
            h = torch.baddbmm(
                self.mlp1_bias[ids].unsqueeze(1), x, self.mlp1_weight.experts(chunk, t.dtype).transpose(1, 2)
            )
            h = swiglu(h, self.alpha, self.limit)
            y = torch.baddbmm(
                self.mlp2_bias[ids].unsqueeze(1), h, self.mlp2_weight.experts(chunk, t.dtype).transpose(1, 2)
            )
            out.index_add_(0, tok, y[g, rows] * w[:, None])
        return out

    def experts_reference(
        self, t: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Plain twin of :meth:`experts`: token by token, expert by expert, reference dequantization."""
        out = torch.zeros_like(t)
        for n in range(t.shape[0]):
            for j in range(self.top_k):
                e = int(indices[n, j])
                h = self.mlp1_weight.expert_reference(e, t.dtype) @ t[n] + self.mlp1_bias[e]
                h = swiglu(h, self.alpha, self.limit)
                y = self.mlp2_weight.expert_reference(e, t.dtype) @ h + self.mlp2_bias[e]
                out[n] += weights[n, j] * y
        return out

    def forward(self, x: torch.Tensor, reference: bool) -> torch.Tensor:
        t = self.norm(x)
        indices, weights = self.route(t)
        fast = self.experts_batched if t.is_cuda else self.experts  # GPUs: fewer launches; CPUs: no padding
        impl = self.experts_reference if reference else fast
        return x + impl(t, indices, weights)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.attn = AttentionBlock(config, layer, device)
        self.mlp = MLPBlock(config, device)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cache: KVCache | None,
        reference: bool,
    ) -> torch.Tensor:
        return self.mlp(self.attn(x, cos_sin, meta, cache, reference), reference)


class GptOss(nn.Module):
    """The whole model. Build it with :meth:`from_checkpoint`; run it under ``torch.inference_mode()``."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size, device=device)
        self.block = nn.ModuleList(
            TransformerBlock(config, n, device) for n in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device)
        self.unembedding = Linear(config.hidden_size, config.vocab_size, bias=False, device=device)
        self.rope = RotaryEmbedding(config, device)
        # True: run the plain reference twins (attention, experts) instead of the fast paths. For tests.
        self.reference = False

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def forward(
        self,
        token_ids: torch.Tensor,
        meta: AttentionMetadata,
        cache: KVCache | None = None,
        logits_indices: torch.Tensor | None = None,
        logits_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[T, vocab]` (float32) for the flattened tokens `token_ids [T]`, or only for the rows
        `logits_indices` (e.g. each sequence's last token).

        With `logits_out` (float32 `[R, vocab]`, R at least the rows computed) they are written into its
        leading rows and that view is returned. A caller that runs step after step keeps one buffer that
        way: a fresh `[64, 201088]` float32 result is 51 MB, which glibc maps anew for every call (it is over
        its mmap threshold), and the CPU then takes a page fault per 4 KB written.
        """
        x = self.embedding(token_ids)
        cos_sin = self.rope.cos_sin(meta.positions)
        for block in self.block:
            x = block(x, cos_sin, meta, cache, self.reference)
        if logits_indices is not None:
            x = x[logits_indices]
        x = self.norm(x)
        if logits_out is None:
            return self.unembedding(x).float()
        assert logits_out.dtype == torch.float32
        return self.unembedding(x, out=logits_out[: x.shape[0]])

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        experts: ExpertMode | str = ExpertMode.PACKED,
        prepack: bool = True,
        progress: bool = True,
    ) -> GptOss:
        """Load a checkpoint directory of either layout straight onto `device`.

        Weights other than the experts take `dtype`; norms and sinks stay float32 (they are tiny and used in
        float32); expert blocks and scales stay packed uint8 unless `experts` is ``"dequantized"``. With
        `prepack` the bf16 matrices are reordered for the CPU where :func:`model.kernels.prepacked.applies` (a
        no-op elsewhere); without it they stay plain, which is the reference the fast path is tested against.
        """
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        device = torch.device(device)
        experts = ExpertMode(experts)
        started = time.perf_counter()
        reader = open_checkpoint(path)
        with torch.device("meta"):
            model = cls(reader.files.config)
        model.load_weights(reader, device=device, dtype=dtype, progress=progress)
        if prepack:  # first: while the experts are still packed, a linear's transient copy costs least
            model.prepack_weights()
        if experts is ExpertMode.DEQUANTIZED:
            for block in model.block:
                block.mlp.mlp1_weight.dequantize_all(dtype, prepack)
                block.mlp.mlp2_weight.dequantize_all(dtype, prepack)
        model.rope = RotaryEmbedding(model.config, device)
        model.eval().requires_grad_(False)
        logger.info(
            "loaded %s (%s layout, %.2f GB on disk) to %s %s with %s experts%s in %.1f s",
            path,
            reader.layout.value,
            reader.nbytes / 1e9,
            device,
            dtype,
            experts.value,
            ", weights prepacked for oneDNN" if model.unembedding.weight.is_mkldnn else "",
            time.perf_counter() - started,
        )
        return model

    def load_weights(
        self, reader: CheckpointReader, *, device: torch.device, dtype: torch.dtype, progress: bool = True
    ) -> None:
        for name, tensor in reader.items(device, progress=progress):
            module_name, attr = name.rsplit(".", 1)
            module = self.get_submodule(module_name)
            if tensor.dtype != torch.uint8:
                keep_fp32 = name.endswith((".scale", "sinks"))
                tensor = tensor.to(torch.float32 if keep_fp32 else dtype)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
            else:
                module._buffers[attr] = tensor
        missed = [n for n, t in self.state_dict().items() if t.is_meta]
        assert not missed, f"not loaded: {missed}"

    def weight_nbytes(self) -> int:
        """Bytes the weights hold: the state dict plus dequantized experts, which live outside it."""
        held = sum(t.nbytes for t in self.state_dict().values())
        for block in self.block:
            for weight in (block.mlp.mlp1_weight, block.mlp.mlp2_weight):
                held += sum(d.nbytes for d in weight.dense or ())
        return held

    def prepack_weights(self) -> None:
        """Reorder every :class:`Linear` weight for the CPU where :func:`model.kernels.prepacked.applies`, and
        store a float32 unembedding on the CPU transposed (:func:`model.kernels.prepacked.column_major`).

        A prepacked weight replaces the plain one (same bytes): its parameter holds an opaque oneDNN tensor.
        """
        for module in self.modules():
            if isinstance(module, Linear) and prepacked.applies(module.weight):
                module.weight = nn.Parameter(prepacked.prepack(module.weight.data), requires_grad=False)
        weight = self.unembedding.weight
        if weight.device.type == "cpu" and weight.dtype == torch.float32:
            self.unembedding.weight = nn.Parameter(prepacked.column_major(weight.data), requires_grad=False)
