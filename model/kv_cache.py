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
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

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
        full_table = self.full_tables.get(rid, [])
        sliding_table = self.sliding_tables.get(rid, [])
        num_computed = request.num_computed_tokens
        if prefix is not None and prefix.num_tokens:
            assert not full_table, "a prefix is taken only on admission"
            num_computed = prefix.num_tokens
        total_blocks = -(-(num_computed + num_new_tokens) // bs)

        held_full = len(full_table) + (len(prefix.full_blocks or []) if prefix else 0)
        new_full = total_blocks - held_full
        # Cached blocks taken from the free queue are no longer available for new allocations.
        reclaimed_full = (
            sum(1 for b in (prefix.full_blocks or []) if self.full.ref_counts[b] == 0) if prefix else 0
        )
        prefix_sliding = [b for b in (prefix.sliding_blocks or []) if b != NULL_BLOCK] if prefix else []
        reclaimed_sliding = sum(1 for b in prefix_sliding if self.sliding.ref_counts[b] == 0)
        sliding_len = len(sliding_table) + (len(prefix.sliding_blocks or []) if prefix else 0)
        # Sliding blocks below the window of the first new token are released before allocating.
        first_needed = self._sliding_range(num_computed).start if self.window else 0
        releasable = sum(
            1 for b in sliding_table[:first_needed] if b != NULL_BLOCK and self.sliding.ref_counts[b] == 1
        )
        new_sliding = total_blocks - sliding_len
        if new_full > self.full.num_free - reclaimed_full:
            return False
        if new_sliding > self.sliding.num_free - reclaimed_sliding + releasable:
            return False

        if prefix is not None and prefix.num_tokens:
            assert prefix.full_blocks is not None
            assert prefix.sliding_blocks is not None
            for b in prefix.full_blocks:
                self.full.touch(b)
            for b in prefix_sliding:
                self.sliding.touch(b)
            full_table = list(prefix.full_blocks)
            sliding_table = list(prefix.sliding_blocks)
        for i in range(min(first_needed, len(sliding_table))):
            if sliding_table[i] != NULL_BLOCK:
                self.sliding.release(sliding_table[i])
                sliding_table[i] = NULL_BLOCK
        if new_full > 0:
            full_table = full_table + self.full.allocate(new_full)
        if new_sliding > 0:
            sliding_table = sliding_table + self.sliding.allocate(new_sliding)
        self.full_tables[rid] = full_table
        self.sliding_tables[rid] = sliding_table
        return True

    def free(self, request: Request) -> None:
        """Give back every block of the request (tail first, so its last blocks are evicted first)."""
        self.num_registered.pop(request.request_id, None)
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
    """Where one group's layers write this step's keys and which slots each sequence reads."""

    slot_mapping: torch.Tensor  # [T] slot of each new token
    gather_index: torch.Tensor  # [S, L] slots each sequence attends to (0 where padded)
    gather_positions: torch.Tensor  # [S, L] their positions, -1 where padded


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
        k_cache[group.slot_mapping] = k.to(k_cache.dtype)
        v_cache[group.slot_mapping] = v.to(v_cache.dtype)
        return KVView(k_cache[group.gather_index], v_cache[group.gather_index], group.gather_positions)


def build_group_step(
    tables: list[list[int]],
    meta: AttentionMetadata,
    block_size: int,
    window: int,
    device: torch.device,
) -> GroupStep:
    """Slot mapping and gather indices for one group, computed with a few tensor ops (no per-token Python).

    Sequences read whole blocks, from the block of the first key their window can reach to the block of their
    last token; positions outside a sequence's range in those blocks are either padding (marked -1) or older
    than the window, which the attention mask excludes by position. Built on the CPU (every torch call here
    costs microseconds of Python, so the per-sequence numbers go in with few calls) and copied to `device`
    without waiting.
    """
    seqs = len(tables)
    first_blocks, block_counts = [], []
    for q, c in zip(meta.query_lens, meta.context_lens, strict=True):
        first = (max(0, c - q - window + 1) if window else 0) // block_size
        first_blocks.append(first)
        block_counts.append(-(-c // block_size) - first)
    width = max(block_counts)
    num_cols = max(len(t) for t in tables)
    flat: list[int] = []
    for table in tables:
        flat += table
        flat += [0] * (num_cols - len(table))
    padded = torch.tensor(flat, dtype=torch.int64).view(seqs, num_cols)
    numbers = torch.tensor([first_blocks, block_counts, meta.context_lens], dtype=torch.int64)
    offsets = torch.arange(width, dtype=torch.int64)
    block_grid = numbers[0, :, None] + offsets  # [S, W] block index of each block read
    real = offsets < numbers[1, :, None]
    blocks = padded.gather(1, torch.where(real, block_grid, numbers[0, :, None]))
    in_block = torch.arange(block_size, dtype=torch.int64)
    gather_index = (blocks[:, :, None] * block_size + in_block).view(seqs, width * block_size)
    positions = (block_grid[:, :, None] * block_size + in_block).view(seqs, width * block_size)
    invalid = positions >= numbers[2, :, None]
    gather_index.masked_fill_(invalid, 0)
    positions.masked_fill_(invalid, -1)
    # The new tokens' slots: the last query_len positions of each sequence.
    new_positions = meta.positions.cpu()
    new_blocks = padded[meta.seq_index.cpu(), new_positions // block_size]
    slot_mapping = new_blocks * block_size + new_positions % block_size
    return GroupStep(
        slot_mapping.to(device, non_blocking=True),
        gather_index.to(device, non_blocking=True),
        positions.to(device, non_blocking=True),
    )
