"""What one forward computes over: the flattened tokens of several sequences, and the KV cache it reads.

**Batching.** A forward takes the flattened tokens of several sequences at once (``token_ids [T]``) with an
:class:`AttentionMetadata` describing which tokens belong to which sequence and at which positions. Sequence
``s`` contributes ``query_lens[s]`` consecutive tokens at positions ``context_lens[s] - query_lens[s]`` ..
``context_lens[s] - 1``: a prefill, a chunk of one, or a single decode token are all the same case.

**KV cache.** Every layer keeps its keys and values as one flat array of token slots, cut into blocks of
``block_size`` slots (:class:`LayerKV`). A forward's :class:`BlockTables`, shared by all layers of one kind
(full or sliding-window attention), say in which slot each new token's key and value go and which blocks
each sequence's queries read, with the position held by every slot read. Attention takes the layer's storage
and those tables and does both the store and the read (:mod:`model.kernels.attention`), so an implementation
may read blocks where they lie. Masks are computed from the key positions alone, so a cache may hand out
blocks in any order and only those a sliding window still reaches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


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
    # or ignore it.
    cache_slots: list[int] | None = None
    # A memo an attention implementation may fill with what depends on the positions only (the torch path's
    # calls and masks), built in the first layer of each kind and reused by the others. Lives as long as this
    # forward; its keys and values are the implementation's own.
    attention_plans: dict[object, object] = field(default_factory=dict, repr=False, compare=False)

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
class BlockTables:
    """Where one forward's new keys go and what each sequence reads, for every layer of one kind."""

    slot_mapping: torch.Tensor  # [T] slot of each new token's key and value
    block_index: torch.Tensor  # [S, W] blocks each sequence reads (padding repeats a real block)
    key_positions: torch.Tensor  # [S, W * block_size] position held by each slot read, -1 where none
    block_size: int


@dataclass(slots=True)
class LayerKV:
    """One layer's cache storage, block `b` holding slots ``b * block_size ..``, and this forward's tables."""

    k: torch.Tensor  # [slots, kv_heads, head_dim]
    v: torch.Tensor  # [slots, kv_heads, head_dim]
    tables: BlockTables


class KVCache(Protocol):
    """Storage for past keys and values, as the model's attention sees it (the engine's paged cache, or
    :class:`model.gpt_oss.ContiguousKVCache`)."""

    def layer(self, layer: int, window: int, meta: AttentionMetadata) -> LayerKV:
        """`layer`'s storage and the tables of this forward (`meta`) for a layer of sliding window `window`
        (0: full attention)."""
        ...
