"""Decode steps through persistent fixed-shape buffers, one CUDA graph per batch-size bucket (the runner's).

A decode step is a few hundred kernel launches of small work each; on a GPU, issuing them from Python takes
longer than running them. A CUDA graph records the launches of one step once and replays them with one call,
but it replays the same shapes on the same memory: so every input the step reads lives in a buffer allocated
once (token ids, positions, the slot of each new key and value, the block tables of both groups), a step
writes its values there (one host-to-device copy for the ints, one per block table) and the batch is padded
up to the next bucket (:data:`BUCKETS`), whose graph is captured on its first use.

Padded rows decode token 0 at position 0 into a scratch block that the runner keeps at the end of each
group's storage, outside the blocks the KV manager hands out; their logits are computed and never read.

Block tables are kept at full width (column j: logical block j of the sequence, from position 0), as the
manager's arrays hold them, for both groups: a released sliding block (-1) is never read, since the Triton
decode attention starts at the window. Lengths are read on the device (a row's position + 1), so the
metadata's host lists only say "one token each" and the captured step never needs them. This needs the
Triton decode path (:class:`model.kernels.triton_attention.TritonAttention`, and the Triton MoE for every
bucket size): the torch paths read lengths on the host and gather keys into padded copies.

On a CPU (or with `capture` off) the same buffers run eagerly each step, so the padding, the copies into the
buffers and the rows read back are tested without a GPU against the runner's ordinary step.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from engine.paged_kv import PagedKVCache, StepKV
from engine.scheduler import SchedulerOutput
from model.batch import AttentionMetadata, BlockTables
from model.gpt_oss import GptOss

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def buckets_for(max_num_seqs: int) -> list[int]:
    """The bucket sizes a batch of up to `max_num_seqs` rows is padded to: :data:`BUCKETS` below it, then
    `max_num_seqs` itself."""
    return [b for b in BUCKETS if b < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    """The persistent buffers of decode steps and their graphs (see the module's docstring)."""

    def __init__(
        self,
        model: GptOss,
        cache: PagedKVCache,
        *,
        max_num_seqs: int,
        max_model_len: int,
        scratch: dict[bool, int],
        capture: bool,
    ) -> None:
        """`scratch[sliding]`: the block padded rows write into, in each group present."""
        self.model = model
        self.cache = cache
        self.block_size = cache.block_size
        self.scratch = scratch
        self.capture = capture
        self.buckets = buckets_for(max_num_seqs)
        top = self.buckets[-1]
        device = model.device
        self.max_blocks = -(-max_model_len // self.block_size)
        # Rows: token ids, positions, slots of the full-attention group, slots of the sliding group.
        self.ints = torch.zeros(4, top, dtype=torch.int64, device=device)
        self.tables = {
            sliding: torch.zeros(top, self.max_blocks, dtype=torch.int64, device=device)
            for sliding in scratch
        }
        self.seq_index = torch.arange(top, device=device)
        self.query_offset = torch.zeros(top, dtype=torch.int64, device=device)
        # The position of each table's column 0 (always 0): all the Triton decode reads of key positions.
        self.starts = torch.zeros(top, 1, dtype=torch.int64, device=device)
        self.logits = torch.empty(top, model.config.vocab_size, dtype=torch.float32, device=device)
        pinned = device.type == "cuda"
        # Host tensors the buffers are copied from, with numpy views to fill them (pinned memory on CUDA, so
        # the copies are queued without the host waiting).
        self._host_ints = _host_buffer((4, top), pinned)
        self._host_tables = {sliding: _host_buffer((top, self.max_blocks), pinned) for sliding in scratch}
        self._ints_np = self._host_ints.numpy()
        self._tables_np = {sliding: t.numpy() for sliding, t in self._host_tables.items()}
        self._copied: torch.cuda.Event | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool: tuple[int, int] | None = None

    def applies(self, plan: SchedulerOutput) -> bool:
        """Whether the step is one these buffers run: decodes only (one new token each, which it samples),
        no LoRA adapter, at most the largest bucket of rows."""
        scheduled = plan.scheduled
        return 0 < len(scheduled) <= self.buckets[-1] and all(
            item.num_new_tokens == 1 and item.samples and not item.request.lora_slot for item in scheduled
        )

    @torch.inference_mode()
    def run(
        self, plan: SchedulerOutput, feed: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The step's logits ``[n, vocab]`` (a view of the persistent logits, valid until the next step), one
        row per scheduled request in order.

        `feed` (rows, token ids) on the device: the tokens of the rows whose token the host does not know yet
        (the previous step sampled it, engine.core's overlapped loop), written into the buffers after the
        host's copy; those rows' requests have a placeholder there."""
        n = len(plan.scheduled)
        bucket = next(b for b in self.buckets if b >= n)
        bs = self.block_size
        if self._copied is not None:  # the pinned buffers are reused: their last copy must be done
            self._copied.synchronize()
        rows = np.array([item.row for item in plan.scheduled], dtype=np.int64)
        positions = np.array([item.request.num_computed_tokens for item in plan.scheduled], dtype=np.int64)
        ints = self._ints_np
        ints[:, n:bucket] = 0
        ints[0, :n] = [
            0 if item.request.num_pending_tokens else item.request.all_token_ids[-1]
            for item in plan.scheduled
        ]
        ints[1, :n] = positions
        width = int(positions.max()) // bs + 1  # table columns any row reads
        for sliding, scratch in self.scratch.items():
            array = plan.sliding_tables if sliding else plan.full_tables
            assert array is not None
            ints[2 + sliding, :n] = array[rows, positions // bs] * bs + positions % bs
            ints[2 + sliding, n:bucket] = scratch * bs
            tables = self._tables_np[sliding]
            tables[:n, :width] = array[rows, :width]
            tables[n:bucket, 0] = scratch
        self.ints[:, :bucket].copy_(self._host_ints[:, :bucket], non_blocking=True)
        if feed is not None:
            self.ints[0].index_copy_(0, *feed)
        for sliding in self.scratch:
            host = self._host_tables[sliding]
            self.tables[sliding][:bucket, :width].copy_(host[:bucket, :width], non_blocking=True)
        if self.ints.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        if not self.capture:
            self._forward(bucket)
        elif bucket in self.graphs:
            self.graphs[bucket].replay()
        else:
            self._capture(bucket)
            self.graphs[bucket].replay()
        return self.logits[:n]

    def _forward(self, bucket: int) -> None:
        """The step over the first `bucket` rows of the buffers, its logits into the persistent ones."""
        b = bucket
        meta = AttentionMetadata(
            [1] * b, [1] * b, self.ints[1, :b], self.seq_index[:b], self.query_offset[:b]
        )
        groups: dict[bool, BlockTables | None] = {False: None, True: None}
        for sliding in self.scratch:
            groups[sliding] = BlockTables(
                self.ints[2 + sliding, :b], self.tables[sliding][:b], self.starts[:b], self.block_size
            )
        step_kv = StepKV(self.cache, groups[False], groups[True])
        self.model(self.ints[0, :b], meta, step_kv, None, self.logits)

    def _capture(self, bucket: int) -> None:
        """Capture the bucket's step. A first run on a side stream compiles what it needs (Triton kernels,
        cuBLAS handles) outside the capture; it computes the current step, whose keys and values the replay
        then writes again, identical."""
        stream = torch.cuda.Stream(self.ints.device)
        stream.wait_stream(torch.cuda.current_stream(self.ints.device))
        with torch.cuda.stream(stream):
            self._forward(bucket)
        torch.cuda.current_stream(self.ints.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # One memory pool for every bucket: a graph keeps no tensor of its own alive after its step (its
        # outputs are the persistent logits), and steps never run at once, so buckets may reuse one memory.
        with torch.cuda.graph(graph, pool=self._pool):
            self._forward(bucket)
        self._pool = graph.pool()
        self.graphs[bucket] = graph
        logger.info("captured the decode step of %d rows as a CUDA graph", bucket)


def _host_buffer(shape: tuple[int, int], pinned: bool) -> torch.Tensor:
    tensor = torch.zeros(shape, dtype=torch.int64)
    return tensor.pin_memory() if pinned else tensor
