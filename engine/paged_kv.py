"""The KV cache's tensors, and one step's view of them for the model. Owned by the runner.

Every layer keeps its keys and values as one flat array of token slots, `num_blocks * block_size` long, in the
blocks of its group (:mod:`engine.kv_cache` says which block belongs to whom). A step turns the block-table
arrays into a slot per new token and, per sequence, the blocks it reads (:func:`plan_group` on the host,
:func:`group_step` on the device, giving the model's :class:`~model.batch.BlockTables`); :class:`StepKV` hands
each layer its tensors and its group's tables, and the model's attention stores and reads through them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.batch import AttentionMetadata, BlockTables, LayerKV
from model.config import ModelConfig


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

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.k, *self.v))


class StepKV:
    """The paged cache for one forward (implements the model's `KVCache` protocol): every layer's tensors with
    the tables of its group."""

    def __init__(self, cache: PagedKVCache, full: BlockTables | None, sliding: BlockTables | None) -> None:
        self.cache = cache
        self.groups = {False: full, True: sliding}

    def layer(self, layer: int, window: int, meta: AttentionMetadata) -> LayerKV:
        tables = self.groups[window > 0]
        assert tables is not None
        return LayerKV(self.cache.k[layer], self.cache.v[layer], tables)


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
) -> BlockTables:
    """A :class:`GroupPlan` once on the device (`blocks` flattened; `offsets` is 0, 1, 2, ..., at least
    W * block_size long). The positions of the slots read are computed there, one per slot, from each
    sequence's first position and length (-1 past its last token), so only the plan's few numbers cross from
    the host."""
    seqs = starts.shape[0]
    width = blocks.shape[0] // seqs
    positions = offsets[: width * block_size] + starts[:, None]
    positions.masked_fill_(positions >= context_lens[:, None], -1)
    return BlockTables(slot_mapping, blocks.view(seqs, width), positions, block_size)


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
