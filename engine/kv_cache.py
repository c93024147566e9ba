"""The paged KV cache's books: who owns which block. Plain Python and numpy; the tensors the blocks index live
in :mod:`engine.paged_kv`, owned by the runner.

Keys and values live in fixed-size blocks of `block_size` token slots. There are two block groups, because
gpt-oss has two kinds of layers:

* **full** (full-attention layers): a request's block table covers every token it has, so memory grows with
  context;
* **sliding** (128-token sliding-window layers): a request keeps only the blocks its next queries can still
  see. Blocks that fell out of the window are released at once, so this group's memory per request is bounded
  by the window plus the tokens of one step, whatever the context length.

**Prefix caching.** Every full block of a request's tokens gets a chained hash (its tokens and the hash of
the block before; the first block's parent is the request's LoRA adapter, so that two adapters, whose keys
and values differ for the same tokens, never share a block). Once computed, a block is registered under its
hash in its group's pool; a block whose owners all finished stays in the free queue with its contents and
hash until it is reused (least recently freed first), so a later request with the same prefix takes it
instead of recomputing. A prefix hit needs the full blocks of the prefix and, for the sliding group, only the
blocks inside the window before the first new token; the last prompt token is always recomputed, so there is
always a token to sample from.

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

from engine.request import Request

NULL_BLOCK = -1  # a sliding-group table entry whose block fell out of the window and was released


def chain_seed(lora_id: int | None) -> bytes | None:
    """The parent of a request's first block: None for the base model, else its adapter's id (ids are never
    reused, so an adapter loaded again under the same name never meets the blocks of the one it replaced)."""
    return None if lora_id is None else b"lora:%d" % lora_id


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
            parent = hashes[-1] if hashes else chain_seed(request.params.lora_id)
            hashes.append(block_hash(parent, tokens[i * bs : (i + 1) * bs]))

    def _sliding_range(self, num_tokens: int) -> range:
        """Indices of the blocks a query at position `num_tokens` can see through the window."""
        first = max(0, num_tokens - self.window + 1) // self.block_size
        return range(first, -(-num_tokens // self.block_size))

    def find_cached_prefix(self, request: Request, max_tokens: int | None = None) -> CachedPrefix:
        """The longest computed prefix of the request's tokens, leaving at least one token to compute, and
        of at most `max_tokens` tokens when given (the positions after it must be computed)."""
        if not self.enable_prefix_caching:
            return CachedPrefix()
        self.update_hashes(request)
        limit = (request.num_tokens - 1) // self.block_size
        if max_tokens is not None:
            limit = min(limit, max_tokens // self.block_size)
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
