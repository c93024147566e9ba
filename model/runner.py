"""Turns a scheduled step into one batched forward and the sampled tokens. Owns the KV tensors.

Every scheduled request contributes its next `num_new_tokens` tokens to one flattened batch. Requests whose
computed tokens reach the end of their known tokens this step (a decode, or the last chunk of a prompt)
get a logits row and a sampled token; the others (prompt chunks still in progress) only fill the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.gpt_oss import AttentionMetadata, GptOss
from model.kv_cache import KVCacheManager, PagedKVCache, StepKV, StepShape, group_step, plan_group
from model.request import TokenLogprob
from model.sampler import Sampler
from model.scheduler import ScheduledRequest


@dataclass(slots=True)
class RunnerOutput:
    """Per scheduled request, in order: the sampled token (None while its prompt is still being filled)."""

    token_ids: list[int | None]
    logprobs: list[TokenLogprob | None]


class ModelRunner:
    def __init__(self, model: GptOss, kv: KVCacheManager, cache: PagedKVCache, sampler: Sampler) -> None:
        self.model = model
        self.kv = kv
        self.cache = cache
        self.sampler = sampler
        self.device = model.device
        config = model.config
        self.has_full = not all(config.layer_sliding)
        self.has_sliding = any(config.layer_sliding)
        self.window = config.sliding_window
        # 0, 1, 2, ... on the device: the slot offsets of the widest KV view so far (grown on demand).
        self._offsets = torch.arange(0, device=self.device)
        # The logits of every step are written here (see GptOss.forward): rows for the most sampling
        # requests of a step so far, grown on demand.
        self._logits = torch.empty(0, config.vocab_size, dtype=torch.float32, device=self.device)

    def prepare(
        self, scheduled: list[ScheduledRequest]
    ) -> tuple[torch.Tensor, AttentionMetadata, StepKV, list[int], torch.Tensor]:
        """Inputs of the forward: token ids, attention metadata, the cache view, the scheduled requests that
        sample (their indices in `scheduled`) and the logits rows they sample from.

        Per request only a few list operations; the per-token and per-block indices come from numpy operations
        over the KV manager's block-table arrays, and reach the device as a few host-to-device copies."""
        tokens: list[int] = []
        query_lens, context_lens, rows, sample_rows = [], [], [], []
        kv_rows = self.kv.rows
        for i, item in enumerate(scheduled):
            request = item.request
            start = request.num_computed_tokens
            end = start + item.num_new_tokens
            if item.num_new_tokens == 1:
                tokens.append(request.all_token_ids[start])
            else:
                tokens.extend(request.all_token_ids[start:end])
            query_lens.append(item.num_new_tokens)
            context_lens.append(end)
            rows.append(kv_rows[request.request_id])
            if end == request.num_tokens:
                sample_rows.append(i)
        bs = self.kv.block_size
        step = StepShape.build(rows, query_lens, context_lens, bs)
        plans = []
        if self.has_full:
            plans.append(plan_group(self.kv.full_array.array, step, bs, 0))
        if self.has_sliding:
            plans.append(plan_group(self.kv.sliding_array.array, step, bs, self.window))
        # Everything the device needs in one host-to-device copy, split there into views.
        if len(sample_rows) == len(tokens):  # all decodes, each sampling from its one row
            logits_rows = step.seq_index
        else:
            logits_rows = np.cumsum(step.query_lens)[sample_rows] - 1
        pieces = [tokens, step.positions, step.seq_index, step.query_offset, logits_rows, step.context_lens]
        for plan in plans:
            pieces += [plan.slot_mapping, plan.blocks.ravel(), plan.starts]
        packed = torch.from_numpy(np.concatenate(pieces, dtype=np.int64)).to(self.device, non_blocking=True)
        parts = packed.split([len(piece) for piece in pieces])
        token_ids, positions_t, seq_index_t, query_offset_t, logits_indices, context_t = parts[:6]
        width = max(plan.blocks.shape[1] for plan in plans) * bs
        if self._offsets.shape[0] < width:
            self._offsets = torch.arange(2 * width, device=self.device)
        groups = []
        for i in range(len(plans)):
            slots, blocks, starts = parts[6 + 3 * i : 9 + 3 * i]
            groups.append(group_step(slots, blocks, starts, context_t, self._offsets, bs))
        full = groups[0] if self.has_full else None
        sliding = groups[-1] if self.has_sliding else None
        meta = AttentionMetadata(query_lens, context_lens, positions_t, seq_index_t, query_offset_t)
        return token_ids, meta, StepKV(self.cache, full, sliding), sample_rows, logits_indices

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest]) -> RunnerOutput:
        token_ids, meta, step_kv, sample_rows, logits_indices = self.prepare(scheduled)
        out_tokens: list[int | None] = [None] * len(scheduled)
        out_logprobs: list[TokenLogprob | None] = [None] * len(scheduled)
        if self._logits.shape[0] < len(sample_rows):
            self._logits = self._logits.new_empty(len(sample_rows), self._logits.shape[1])
        logits = self.model(token_ids, meta, step_kv, logits_indices, self._logits)
        if not sample_rows:  # only prompt chunks: the forward filled the cache, nothing to sample
            return RunnerOutput(out_tokens, out_logprobs)
        requests = [scheduled[i].request for i in sample_rows]
        sampled = self.sampler.sample(
            logits,
            [r.params for r in requests],
            [r.output_token_ids for r in requests],
            [r.generator for r in requests],
        )
        for row, token, logprob in zip(sample_rows, sampled.token_ids, sampled.logprobs, strict=True):
            out_tokens[row] = token
            out_logprobs[row] = logprob
        return RunnerOutput(out_tokens, out_logprobs)
