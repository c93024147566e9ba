"""The paged KV cache: who owns which block (KVCacheManager), and the tensors blocks live in (PagedKVCache).

Keys and values live in fixed-size blocks of `block_size` token slots. There are two block groups, because
gpt-oss has two kinds of layers:

* **full** (full-attention layers): a request's block table covers every token it has, so memory grows with
  context;
* **sliding** (128-token sliding-window layers): a request keeps only the blocks its next queries can still
  see. Blocks that fell out of the window are released at once, so this group's memory per request is bounded
  by the window plus the tokens of one step, whatever the context length.

**Prefix caching.** Every full block of a request's tokens gets a chained hash (its tokens and the hash of
the block before). Once computed, a block is registered under its hash in its group's pool; a block whose
owners all finished stays in the free queue with its contents and hash until it is reused (least recently
freed first), so a later request with the same prefix takes it instead of recomputing. A prefix hit needs
the full blocks of the prefix and, for the sliding group, only the blocks inside the window before the first
new token; the last prompt token is always recomputed, so there is always a token to sample from.

**Block-table arrays.** The tables are Python lists (the books), and each group also keeps them as one numpy
array with a row per request holding blocks (:class:`BlockTableArray`), written as the lists change: only the
entries that changed, a few per step at most. The runner builds a step's slot indices from the array with a
handful of vectorised operations instead of walking every table.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from model.config import ModelConfig
from model.gpt_oss import AttentionMetadata, KVView
from model.request import Request

NULL_BLOCK = -1  # a sliding-group table entry whose block fell out of the window and was released


def block_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    """The chained hash of a full block: its tokens and its parent's hash."""
    digest = hashlib.blake2b(digest_size=16)
    if parent is not None:
        digest.update(parent)
    digest.update(array("i", tokens).tobytes())
    return digest.digest()


class BlockPool:
    """The blocks of one group: reference counts, the free queue and the hash index of computed blocks."""

    def __init__(self, num_blocks: int) -> None:
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        # Free blocks, evicted from the front; a block freed last is reused last.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self.free), "caller checks capacity first"
        blocks = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            stale = self.hash_of[block]
            if stale is not None:  # evict its cached contents
                if self.cached.get(stale) == block:
                    del self.cached[stale]
                self.hash_of[block] = None
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def touch(self, block: int) -> None:
        """Take a reference to a computed block (a prefix-cache hit)."""
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} released more often than taken"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free[block] = None

    def register(self, block: int, key: bytes) -> None:
        """Record that `block` holds the computed tokens hashed `key`."""
        if self.hash_of[block] is None and key not in self.cached:
            self.cached[key] = block
            self.hash_of[block] = key

    def lookup(self, key: bytes) -> int | None:
        return self.cached.get(key)


class BlockTableArray:
    """One group's block tables as an int64 array ``[rows, columns]``: row r holds the table of the request
    given row r, and NULL_BLOCK past its length. A mirror of the lists, written by the manager only."""

    def __init__(self) -> None:
        self.array = np.full((8, 64), NULL_BLOCK, dtype=np.int64)

    def write(self, row: int, start: int, blocks: list[int]) -> None:
        """Set entries ``start, start + 1, ...`` of `row` to `blocks`."""
        rows, columns = self.array.shape
        end = start + len(blocks)
        if row >= rows or end > columns:  # grow by doubling: rare, and amortised
            grown = np.full((max(rows, 2 * row + 1), max(columns, 2 * end)), NULL_BLOCK, dtype=np.int64)
            grown[:rows, :columns] = self.array
            self.array = grown
        self.array[row, start:end] = blocks

    def clear(self, row: int) -> None:
        self.array[row] = NULL_BLOCK


@dataclass(slots=True)
class CachedPrefix:
    """A prefix-cache hit: its length in tokens and the blocks to take, per group."""

    num_tokens: int = 0
    full_blocks: list[int] | None = None
    sliding_blocks: list[int] | None = None


class KVCacheManager:
    """Owns the block tables of all requests and the two block pools. Knows nothing of tensors."""

    def __init__(
        self,
        *,
        block_size: int,
        num_full_blocks: int,
        num_sliding_blocks: int,
        window: int,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.block_size = block_size
        self.window = window
        self.enable_prefix_caching = enable_prefix_caching
        self.full = BlockPool(num_full_blocks)
        self.sliding = BlockPool(num_sliding_blocks)
        self.full_tables: dict[str, list[int]] = {}
        self.sliding_tables: dict[str, list[int]] = {}
        self.num_registered: dict[str, int] = {}  # per request: its leading blocks already indexed
        # Per request: its leading sliding-table entries already released (NULL_BLOCK), so each step looks
        # only at the entries the window has just left.
        self.num_released: dict[str, int] = {}
        # Per request holding blocks: its row in both groups' table arrays.
        self.rows: dict[str, int] = {}
        self._free_rows: list[int] = []
        self.full_array = BlockTableArray()
        self.sliding_array = BlockTableArray()
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found in the cache

    # -- prefix cache ---------------------------------------------------------------------------------------

    def update_hashes(self, request: Request) -> None:
        """Extend the request's block hashes over its full blocks."""
        bs = self.block_size
        hashes = request.block_hashes
        tokens = request.all_token_ids
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs]))

    def _sliding_range(self, num_tokens: int) -> range:
        """Indices of the blocks a query at position `num_tokens` can see through the window."""
        first = max(0, num_tokens - self.window + 1) // self.block_size
        return range(first, -(-num_tokens // self.block_size))

    def find_cached_prefix(self, request: Request) -> CachedPrefix:
        """The longest computed prefix of the request's tokens, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return CachedPrefix()
        self.update_hashes(request)
        limit = (request.num_tokens - 1) // self.block_size
        full: list[int] = []
        for key in request.block_hashes[:limit]:
            block = self.full.lookup(key)
            if block is None:
                break
            full.append(block)
        k = len(full)
        while k > 0:
            sliding = [
                self.sliding.lookup(request.block_hashes[i]) for i in self._sliding_range(k * self.block_size)
            ]
            if all(b is not None for b in sliding):
                first = self._sliding_range(k * self.block_size).start
                table = [NULL_BLOCK] * first + [b for b in sliding if b is not None]
                return CachedPrefix(k * self.block_size, full[:k], table)
            k -= 1
        return CachedPrefix()

    def register_computed(self, request: Request) -> None:
        """Index the request's computed full blocks under their hashes, for later requests to reuse."""
        if not self.enable_prefix_caching:
            return
        self.update_hashes(request)
        computed_blocks = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        full_table = self.full_tables[request.request_id]
        sliding_table = self.sliding_tables[request.request_id]
        for i in range(self.num_registered.get(request.request_id, 0), computed_blocks):
            key = request.block_hashes[i]
            self.full.register(full_table[i], key)
            if sliding_table[i] != NULL_BLOCK:
                self.sliding.register(sliding_table[i], key)
        self.num_registered[request.request_id] = max(
            computed_blocks, self.num_registered.get(request.request_id, 0)
        )

    # -- allocation -----------------------------------------------------------------------------------------

    def allocate_slots(
        self, request: Request, num_new_tokens: int, prefix: CachedPrefix | None = None
    ) -> bool:
        """Make room for `num_new_tokens` more tokens of `request` (after taking `prefix`, on admission).

        Either every block needed is taken and True is returned, or nothing changes and False is returned.
        """
        rid = request.request_id
        bs = self.block_size
        if prefix is None and rid in self.full_tables:
            # The common decode step, first and cheap: the token fits the last block and the window has left
            # no block behind (a negative floor quotient counts as block 0).
            end = request.num_computed_tokens + num_new_tokens
            behind = (request.num_computed_tokens - self.window + 1) // bs if self.window else 0
            if len(self.full_tables[rid]) * bs >= end and behind <= self.num_released[rid]:
                return True
        taking_prefix = prefix is not None and prefix.num_tokens > 0
        num_computed = (
            prefix.num_tokens if prefix is not None and taking_prefix else request.num_computed_tokens
        )
        total_blocks = -(-(num_computed + num_new_tokens) // bs)
        # Sliding blocks below the window of the first new token are released before allocating.
        first_needed = self._sliding_range(num_computed).start if self.window else 0
        released = self.num_released.get(rid, 0)
        full_table = self.full_tables.get(rid, [])
        sliding_table = self.sliding_tables.get(rid, [])
        if taking_prefix:
            assert not full_table, "a prefix is taken only on admission"
        held_full = len(full_table) + (len(prefix.full_blocks or []) if prefix else 0)
        new_full = total_blocks - held_full
        # Cached blocks taken from the free queue are no longer available for new allocations.
        reclaimed_full = (
            sum(1 for b in (prefix.full_blocks or []) if self.full.ref_counts[b] == 0) if prefix else 0
        )
        prefix_sliding = [b for b in (prefix.sliding_blocks or []) if b != NULL_BLOCK] if prefix else []
        reclaimed_sliding = sum(1 for b in prefix_sliding if self.sliding.ref_counts[b] == 0)
        sliding_len = len(sliding_table) + (len(prefix.sliding_blocks or []) if prefix else 0)
        releasable = sum(
            1
            for b in sliding_table[released:first_needed]
            if b != NULL_BLOCK and self.sliding.ref_counts[b] == 1
        )
        new_sliding = total_blocks - sliding_len
        if new_full > self.full.num_free - reclaimed_full:
            return False
        if new_sliding > self.sliding.num_free - reclaimed_sliding + releasable:
            return False

        if prefix is not None and taking_prefix:
            assert prefix.full_blocks is not None
            assert prefix.sliding_blocks is not None
            for b in prefix.full_blocks:
                self.full.touch(b)
            for b in prefix_sliding:
                self.sliding.touch(b)
            full_table = list(prefix.full_blocks)
            sliding_table = list(prefix.sliding_blocks)
        written_full = len(full_table) if rid in self.rows else 0
        written_sliding = min(released, len(sliding_table)) if rid in self.rows else 0
        for i in range(released, min(first_needed, len(sliding_table))):
            if sliding_table[i] != NULL_BLOCK:
                self.sliding.release(sliding_table[i])
                sliding_table[i] = NULL_BLOCK
        if new_full > 0:
            full_table = full_table + self.full.allocate(new_full)
        if new_sliding > 0:
            sliding_table = sliding_table + self.sliding.allocate(new_sliding)
        self.full_tables[rid] = full_table
        self.sliding_tables[rid] = sliding_table
        self.num_released[rid] = max(released, min(first_needed, len(sliding_table)))
        row = self.rows.get(rid)
        if row is None:
            row = self._free_rows.pop() if self._free_rows else len(self.rows)
            self.rows[rid] = row
        self.full_array.write(row, written_full, full_table[written_full:])
        self.sliding_array.write(row, written_sliding, sliding_table[written_sliding:])
        return True

    def free(self, request: Request) -> None:
        """Give back every block of the request (tail first, so its last blocks are evicted first)."""
        self.num_registered.pop(request.request_id, None)
        self.num_released.pop(request.request_id, None)
        row = self.rows.pop(request.request_id, None)
        if row is not None:
            self.full_array.clear(row)
            self.sliding_array.clear(row)
            self._free_rows.append(row)
        for block in reversed(self.full_tables.pop(request.request_id, [])):
            self.full.release(block)
        for block in reversed(self.sliding_tables.pop(request.request_id, [])):
            if block != NULL_BLOCK:
                self.sliding.release(block)

    def note_prefix_lookup(self, num_prompt_tokens: int, num_hit: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


# -- the tensors --------------------------------------------------------------------------------------------


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, sliding: bool) -> int:
    """Memory of one block of one group: K and V of every layer of that group."""
    layers = sum(1 for s in config.layer_sliding if s == sliding)
    return layers * 2 * block_size * config.num_key_value_heads * config.head_dim * dtype.itemsize


class PagedKVCache:
    """The key and value tensors of every layer, as flat slot arrays of its group's blocks."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        block_size: int,
        num_full_blocks: int,
        num_sliding_blocks: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.config = config
        self.block_size = block_size
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for sliding in config.layer_sliding:
            slots = (num_sliding_blocks if sliding else num_full_blocks) * block_size
            shape = (slots, config.num_key_value_heads, config.head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))


@dataclass(slots=True)
class GroupStep:
    """Where one group's layers write this step's keys and which blocks each sequence reads."""

    slot_mapping: torch.Tensor  # [T] slot of each new token
    block_index: torch.Tensor  # [S, W] blocks each sequence reads, in order (padding repeats a real block)
    gather_positions: torch.Tensor  # [S, W * block_size] the positions of their slots, -1 where padded


class StepKV:
    """The model's view of the paged cache for one forward (implements the model's `KVCache` protocol)."""

    def __init__(self, cache: PagedKVCache, full: GroupStep | None, sliding: GroupStep | None) -> None:
        self.cache = cache
        self.groups = {False: full, True: sliding}

    def store_and_view(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, window: int
    ) -> KVView:
        group = self.groups[window > 0]
        assert group is not None
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        k_cache.index_copy_(0, group.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, group.slot_mapping, v.to(v_cache.dtype))
        # Whole blocks, each one contiguous row of the cache seen as [blocks, block_size * heads * dim].
        index = group.block_index
        shape = (index.shape[0], group.gather_positions.shape[1], *k_cache.shape[1:])
        row = self.cache.block_size * k_cache.shape[1] * k_cache.shape[2]
        return KVView(
            k_cache.view(-1, row).index_select(0, index.view(-1)).view(shape),
            v_cache.view(-1, row).index_select(0, index.view(-1)).view(shape),
            group.gather_positions,
        )


@dataclass(slots=True)
class StepShape:
    """The numbers of one step that every group's indices are built from, as numpy int64 arrays."""

    rows: np.ndarray  # [S] each sequence's row in the block-table arrays
    query_lens: np.ndarray  # [S]
    context_lens: np.ndarray  # [S]
    last_blocks: np.ndarray  # [S] index of each sequence's last block
    seq_index: np.ndarray  # [T] the sequence of every new token
    query_offset: np.ndarray  # [T] its index among its sequence's new tokens
    positions: np.ndarray  # [T] its absolute position
    token_blocks: np.ndarray  # [T] the index of its block in its sequence's table (positions // block_size)
    token_offsets: np.ndarray  # [T] its slot in that block (positions % block_size)
    token_rows: np.ndarray  # [T] its sequence's row in the block-table arrays

    @classmethod
    def build(
        cls, rows: list[int], query_lens: list[int], context_lens: list[int], block_size: int
    ) -> StepShape:
        q = np.array(query_lens, dtype=np.int64)
        c = np.array(context_lens, dtype=np.int64)
        seqs, num_tokens = len(query_lens), int(q.sum())
        if num_tokens == seqs:  # all decodes, the common step: one token per sequence, its last
            positions = c - 1
            token_blocks, token_offsets = np.divmod(positions, block_size)
            row_array = np.array(rows, dtype=np.int64)
            return cls(
                row_array,
                q,
                c,
                token_blocks,
                np.arange(seqs),
                np.zeros(seqs, dtype=np.int64),
                positions,
                token_blocks,
                token_offsets,
                row_array,
            )
        seq_index = np.repeat(np.arange(seqs), q)
        query_offset = np.arange(num_tokens) - (np.cumsum(q) - q)[seq_index]
        positions = (c - q)[seq_index] + query_offset
        token_blocks, token_offsets = np.divmod(positions, block_size)
        row_array = np.array(rows, dtype=np.int64)
        return cls(
            row_array,
            q,
            c,
            (c - 1) // block_size,
            seq_index,
            query_offset,
            positions,
            token_blocks,
            token_offsets,
            row_array[seq_index],
        )


@dataclass(slots=True)
class GroupPlan:
    """One group's step on the host: a few numbers per sequence and per new token (numpy int64)."""

    slot_mapping: np.ndarray  # [T] slot of each new token
    blocks: np.ndarray  # [S, W] blocks each sequence reads (padding repeats its last block)
    starts: np.ndarray  # [S] position of the first slot each sequence reads


def plan_group(table: np.ndarray, step: StepShape, block_size: int, window: int) -> GroupPlan:
    """Slot mapping and blocks read for one group, from its block-table array, with a few numpy operations.

    Sequences read whole blocks, from the block of the first key their window can reach to the block of their
    last token; positions outside a sequence's range in those blocks are either padding or older than the
    window, which the attention mask excludes by position (see :func:`group_step`).
    """
    last = step.last_blocks
    # Padding columns repeat the sequence's last block: a real block, whose keys the mask ignores there.
    if window:
        first = np.maximum(step.context_lens - step.query_lens - window + 1, 0) // block_size
        columns = np.minimum(first[:, None] + np.arange(int((last - first).max()) + 1), last[:, None])
        starts = first * block_size
    else:
        columns = np.minimum(np.arange(int(last.max()) + 1), last[:, None])
        starts = np.zeros_like(last)
    slot_mapping = table[step.token_rows, step.token_blocks] * block_size + step.token_offsets
    return GroupPlan(slot_mapping, table[step.rows[:, None], columns], starts)


def group_step(
    slot_mapping: torch.Tensor,
    blocks: torch.Tensor,
    starts: torch.Tensor,
    context_lens: torch.Tensor,
    offsets: torch.Tensor,
    block_size: int,
) -> GroupStep:
    """A :class:`GroupPlan` once on the device (`blocks` flattened; `offsets` is 0, 1, 2, ..., at least
    W * block_size long). The positions of the slots read are computed there, one per slot, from each
    sequence's first position and length (-1 past its last token), so only the plan's few numbers cross from
    the host."""
    seqs = starts.shape[0]
    width = blocks.shape[0] // seqs
    positions = offsets[: width * block_size] + starts[:, None]
    positions.masked_fill_(positions >= context_lens[:, None], -1)
    return GroupStep(slot_mapping, blocks.view(seqs, width), positions)


def group_step_reference(
    table: list[list[int]], query_lens: list[int], context_lens: list[int], block_size: int, window: int
) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """Plain twin of :func:`plan_group` and :func:`group_step`, from the list tables, slot by slot: the slot
    mapping, the slots each sequence reads (0 where padded) and their positions (-1 there), as lists. For
    tests."""
    starts = []
    for q, c in zip(query_lens, context_lens, strict=True):
        starts.append((max(0, c - q - window + 1) if window else 0) // block_size * block_size)
    width = max(-(-c // block_size) * block_size - s for c, s in zip(context_lens, starts, strict=True))
    slots: list[int] = []
    gather: list[list[int]] = []
    positions: list[list[int]] = []
    for blocks, q, c, start in zip(table, query_lens, context_lens, starts, strict=True):
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(c - q, c)]
        row = [p if p < c else -1 for p in range(start, start + width)]
        positions.append(row)
        gather.append([blocks[p // block_size] * block_size + p % block_size if p >= 0 else 0 for p in row])
    return slots, gather, positions
