"""Turns a scheduled step into one batched forward and the sampled tokens. Owns the KV tensors.

Every scheduled request contributes its next `num_new_tokens` tokens to one flattened batch. Requests whose
computed tokens reach the end of their known tokens this step (a decode, or the last chunk of a prompt)
get a logits row and a sampled token; the others (prompt chunks still in progress) only fill the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.gpt_oss import AttentionMetadata, GptOss
from model.kv_cache import KVCacheManager, PagedKVCache, StepKV, build_group_step
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

    def prepare(
        self, scheduled: list[ScheduledRequest]
    ) -> tuple[torch.Tensor, AttentionMetadata, StepKV, list[int]]:
        """Inputs of the forward: token ids, attention metadata, the cache view and the rows to sample."""
        tokens: list[int] = []
        query_lens, context_lens, sample_rows = [], [], []
        for i, item in enumerate(scheduled):
            request = item.request
            start = request.num_computed_tokens
            end = start + item.num_new_tokens
            tokens.extend(request.all_token_ids[start:end])
            query_lens.append(item.num_new_tokens)
            context_lens.append(end)
            if end == request.num_tokens:
                sample_rows.append(i)
        meta = AttentionMetadata.build(query_lens, context_lens, device="cpu")
        bs = self.kv.block_size
        ids = [s.request.request_id for s in scheduled]
        full = (
            build_group_step([self.kv.full_tables[r] for r in ids], meta, bs, 0, self.device)
            if self.has_full
            else None
        )
        sliding = (
            build_group_step([self.kv.sliding_tables[r] for r in ids], meta, bs, self.window, self.device)
            if self.has_sliding
            else None
        )
        device_meta = AttentionMetadata(
            meta.query_lens,
            meta.context_lens,
            meta.positions.to(self.device, non_blocking=True),
            meta.seq_index.to(self.device, non_blocking=True),
            meta.query_offset.to(self.device, non_blocking=True),
        )
        token_tensor = torch.tensor(tokens, dtype=torch.int64).to(self.device, non_blocking=True)
        return token_tensor, device_meta, StepKV(self.cache, full, sliding), sample_rows

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest]) -> RunnerOutput:
        token_ids, meta, step_kv, sample_rows = self.prepare(scheduled)
        # Each sampling sequence's last token is the row its next token is predicted from.
        ends = torch.tensor(meta.query_lens).cumsum(0) - 1
        logits_indices = ends[sample_rows].to(self.device)
        out_tokens: list[int | None] = [None] * len(scheduled)
        out_logprobs: list[TokenLogprob | None] = [None] * len(scheduled)
        logits = self.model(token_ids, meta, step_kv, logits_indices)
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
