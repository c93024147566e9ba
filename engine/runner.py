"""Turns a scheduled step into one batched forward and the sampled tokens.

The runner owns the model, the KV tensors (sized here, after a warm-up forward on a GPU), the step's index
tensors, the logits buffer and the sampler. It reads the scheduler's plan and the requests in it, and
changes neither: what a step produced goes back to the scheduler as a :class:`RunnerOutput`.

Every scheduled request contributes its next `num_new_tokens` tokens to one flattened batch. Requests whose
computed tokens reach the end of their known tokens this step (a decode, or the last chunk of a prompt)
get a logits row and a sampled token; the others (prompt chunks still in progress) only fill the cache.

Sampling: on CUDA (or where `EngineConfig.device_sampling` says) a step whose requests the device sampler
serves (:func:`engine.device_sampler.supports`) samples on the device: its settings travel in the step's one
host-to-device copy and the sampled ids come back in one device-to-host copy, the step's only sync. Other
steps (logits processors, grammars, logprobs, prompt logprobs) and the CPU take the host sampler.

The overlapped loop (engine.core) runs such device-sampled steps through :meth:`ModelRunner.launch`, which
returns before the step is done: the sampled ids stay on the device, where the next launch reads the tokens
of its placeholder rows from them, and their copy to the host is queued behind the step; :meth:`collect`
waits for that copy alone, so the host handles a step's tokens while the device computes the next.

A request that asks for prompt logprobs also gets the logits of the prompt positions it runs, in the same
forward (no second pass): position p's logits score prompt token p + 1, so a chunk's last position scores
the next chunk's first token. Those rows are unembedded `PROMPT_LOGPROB_ROWS` at a time, so a 2048-token
chunk never holds a `[2048, vocab]` float32 matrix at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import EngineConfig
from engine.constraint import TokenMasker
from engine.device_sampler import DeviceSampler, SamplingPlan, supports
from engine.graphs import DecodeGraphs
from engine.paged_kv import PagedKVCache, StepKV, StepShape, bytes_per_block, group_step, plan_group
from engine.request import TokenLogprob
from engine.sampler import _NO_TOKEN, Sampler, score_tokens
from engine.scheduler import RunnerOutput, SchedulerOutput
from model.gpt_oss import AttentionMetadata, GptOss

logger = logging.getLogger(__name__)

CPU_KV_CACHE_MEMORY = 1 << 30  # bytes of KV cache on a CPU unless configured
# Prompt positions unembedded at once for prompt logprobs: 128 x 201,088 float32 logits are 103 MB, and
# their log-softmax as much again.
PROMPT_LOGPROB_ROWS = 128


@dataclass(slots=True)
class PromptScoring:
    """The prompt positions one step scores: per row of the flattened batch to unembed, the token it scores,
    how many alternatives its request wants, and which scheduled request it belongs to."""

    rows: list[int]
    targets: list[int]
    num_top: list[int]
    owners: list[int]


@dataclass(slots=True)
class StepInputs:
    """The forward's inputs on the device: token ids, attention metadata, the cache view, the scheduled
    requests that sample (their indices in the plan) and the logits rows they sample from, each token's LoRA
    slot (None when no request has an adapter), and the extra arrays the caller sent along (the sampler's)."""

    token_ids: torch.Tensor
    meta: AttentionMetadata
    step_kv: StepKV
    sample_rows: list[int]
    logits_indices: torch.Tensor
    lora: torch.Tensor | None
    extra: list[torch.Tensor]


@dataclass(slots=True)
class LaunchedStep:
    """A step the device runs or has run, whose sampled ids the host has not read: the plan, the
    scheduled requests that sampled (their indices in the plan) in the order of `token_ids`, the ids on
    the device (the next step's tokens come from them) and their copy on the host, complete once `copied`
    is (None: it already is)."""

    plan: SchedulerOutput
    sample_rows: list[int]
    token_ids: torch.Tensor
    host_ids: torch.Tensor
    copied: torch.cuda.Event | None

    def index_of(self) -> dict[str, int]:
        """Per request that sampled, its id's index in `token_ids`."""
        scheduled = self.plan.scheduled
        return {scheduled[row].request.request_id: k for k, row in enumerate(self.sample_rows)}


@dataclass(slots=True)
class KVBlocks:
    """How many blocks of each group the KV tensors hold."""

    num_full: int
    num_sliding: int


def kv_blocks(model: GptOss, config: EngineConfig, budget: int | None) -> KVBlocks:
    """Split a memory budget (bytes) between the two block groups, or take `config.num_kv_blocks`.

    The sliding group needs at most (window + one step's tokens) per running request, and gets at least an
    eighth of the budget so that windows survive for prefix reuse; the rest is full-attention."""
    mc, bs = model.config, config.block_size
    window_blocks = -(-(mc.sliding_window - 1) // bs) + 2
    min_sliding = config.max_num_seqs * window_blocks + -(-config.max_num_batched_tokens // bs)
    full_bytes = bytes_per_block(mc, bs, model.dtype, sliding=False)
    sliding_bytes = bytes_per_block(mc, bs, model.dtype, sliding=True)
    if config.num_kv_blocks is not None:
        num_full = config.num_kv_blocks
        num_sliding = max(min_sliding, num_full // 8)
    else:
        assert budget is not None
        num_sliding = max(min_sliding, budget // 8 // max(sliding_bytes, 1)) if sliding_bytes else 1
        num_full = (budget - num_sliding * sliding_bytes) // full_bytes if full_bytes else 1
    if num_full < 1:
        raise ValueError(
            f"the KV cache budget leaves no full-attention blocks beside {num_sliding} sliding ones; "
            "raise kv_cache_memory or lower max_num_seqs / max_num_batched_tokens"
        )
    return KVBlocks(num_full, num_sliding)


class ModelRunner:
    def __init__(self, model: GptOss, config: EngineConfig, max_model_len: int) -> None:
        self.model = model
        self.config = config
        self.max_model_len = max_model_len
        self.block_size = config.block_size
        self.device = model.device
        budget = None if config.num_kv_blocks is not None else self._kv_budget()
        self.blocks = kv_blocks(model, config, budget)
        # With decode graphs, one more block per group past those the KV manager hands out: padded rows'.
        scratch = int(config.cuda_graphs)
        self.cache = PagedKVCache(
            model.config,
            block_size=config.block_size,
            num_full_blocks=self.blocks.num_full + scratch,
            num_sliding_blocks=self.blocks.num_sliding + scratch,
            dtype=model.dtype,
            device=model.device,
        )
        self.sampler = Sampler()
        self.masker = TokenMasker(self.device)
        self.device_sampler = DeviceSampler()
        if config.device_sampling is not None:
            self.device_sampling = config.device_sampling
        else:  # the overlapped loop needs it; otherwise the GPU's, and the CPU keeps the host sampler
            self.device_sampling = bool(config.async_scheduling) or self.device.type == "cuda"
        # Pinned host memory the uploads go through on CUDA (grown on demand), and the event of its last copy.
        self._stage = torch.empty(0, dtype=torch.int64)
        self._stage_done: torch.cuda.Event | None = None
        # Pinned host memory launched steps' ids are copied into, used in turn: a step's ids are read before
        # the step after next is launched, so two suffice (allocated on CUDA's first launch).
        self._host_ids: list[torch.Tensor] = []
        self._launches = 0
        logger.info(
            "KV cache: %d full-attention and %d sliding-window blocks of %d tokens (%.0f MiB), context %d",
            self.blocks.num_full,
            self.blocks.num_sliding,
            config.block_size,
            self.cache.nbytes / 2**20,
            max_model_len,
        )
        layers = model.config.layer_sliding
        self.has_full = not all(layers)
        self.has_sliding = any(layers)
        self.window = model.config.sliding_window
        # 0, 1, 2, ... on the device: the slot offsets of the widest KV view so far (grown on demand).
        self._offsets = torch.arange(0, device=self.device)
        # The logits of every step are written here (see GptOss.forward): rows for the most sampling
        # requests of a step so far, grown on demand.
        self._logits = torch.empty(0, model.config.vocab_size, dtype=torch.float32, device=self.device)
        self.graphs = self._decode_graphs() if config.cuda_graphs else None

    def _decode_graphs(self) -> DecodeGraphs:
        from model.kernels.triton_attention import TritonAttention
        from model.kernels.triton_moe import DECODE_MAX_TOKENS

        if not all(isinstance(block.attn.attention, TritonAttention) for block in self.model.block):
            raise ValueError("decode graphs need the Triton kernels (Kernels.triton(), --kernels triton)")
        scratch = {}
        if self.has_full:
            scratch[False] = self.blocks.num_full
        if self.has_sliding:
            scratch[True] = self.blocks.num_sliding
        return DecodeGraphs(
            self.model,
            self.cache,
            # Batches the decode MoE kernels take; larger ones (the grouped GEMM, sync-free too) run eagerly
            # until captured graphs of them have been checked on a GPU.
            max_num_seqs=min(self.config.max_num_seqs, DECODE_MAX_TOKENS),
            max_model_len=self.max_model_len,
            scratch=scratch,
            capture=self.device.type == "cuda",
        )

    def _kv_budget(self) -> int:
        if self.config.kv_cache_memory is not None:
            return self.config.kv_cache_memory
        if self.device.type != "cuda":
            return CPU_KV_CACHE_MEMORY
        # What a warm-up forward leaves free, less a safety margin.
        self._warm_up()
        free, total = torch.cuda.mem_get_info(self.device)
        reserve = total * (1 - self.config.gpu_memory_utilization)
        return max(0, int(free - reserve))

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """One forward of a full token budget without a cache, so its activations are counted as used."""
        n = min(self.config.max_num_batched_tokens, self.max_model_len)
        meta = AttentionMetadata.build([n], device=self.device)
        self.model(torch.zeros(n, dtype=torch.int64, device=self.device), meta)
        torch.cuda.synchronize(self.device)

    def prepare(self, plan: SchedulerOutput, extra: list[np.ndarray] | None = None) -> StepInputs:
        """The forward's inputs (:class:`StepInputs`), with `extra` int64 arrays sent along in the same copy.

        Per request only a few list operations; the per-token and per-block indices come from numpy operations
        over the plan's block-table arrays, and reach the device in one host-to-device copy."""
        scheduled = plan.scheduled
        tokens: list[int] = []
        query_lens, context_lens, rows, sample_rows, lora_slots = [], [], [], [], []
        for i, item in enumerate(scheduled):
            request = item.request
            lora_slots.append(request.lora_slot)
            start = request.num_computed_tokens
            end = start + item.num_new_tokens
            if item.num_new_tokens == 1:
                # A placeholder's token is on the device only: the caller writes it in (launch).
                tokens.append(0 if request.num_pending_tokens else request.all_token_ids[start])
            else:
                tokens.extend(request.all_token_ids[start:end])
            query_lens.append(item.num_new_tokens)
            context_lens.append(end)
            rows.append(item.row)
            if item.samples:
                sample_rows.append(i)
        bs = self.block_size
        step = StepShape.build(rows, query_lens, context_lens, bs)
        plans = []
        if self.has_full:
            assert plan.full_tables is not None
            plans.append(plan_group(plan.full_tables, step, bs, 0))
        if self.has_sliding:
            assert plan.sliding_tables is not None
            plans.append(plan_group(plan.sliding_tables, step, bs, self.window))
        # Everything the device needs in one host-to-device copy, split there into views.
        if len(sample_rows) == len(tokens):  # all decodes, each sampling from its one row
            logits_rows = step.seq_index
        else:
            logits_rows = np.cumsum(step.query_lens)[sample_rows] - 1
        pieces = [tokens, step.positions, step.seq_index, step.query_offset, logits_rows, step.context_lens]
        for plan in plans:
            pieces += [plan.slot_mapping, plan.blocks.ravel(), plan.starts]
        with_lora = any(lora_slots)
        if with_lora:
            pieces.append(np.repeat(lora_slots, query_lens))
        extra = extra or []
        parts = self.upload(pieces + extra)
        if extra:
            extra_parts, parts = parts[len(pieces) :], parts[: len(pieces)]
        else:
            extra_parts = []
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
        lora = parts[-1] if with_lora else None
        step_kv = StepKV(self.cache, full, sliding)
        return StepInputs(token_ids, meta, step_kv, sample_rows, logits_indices, lora, list(extra_parts))

    def upload(self, pieces: list[np.ndarray]) -> list[torch.Tensor]:
        """int64 arrays on the device, as views of one host-to-device copy. On CUDA the copy goes through
        pinned memory, so it is queued without waiting (from pageable memory the host would wait for it);
        the staging buffer is reused once its previous copy is done."""
        packed = np.concatenate(pieces, dtype=np.int64) if pieces else np.zeros(0, dtype=np.int64)
        if self.device.type != "cuda":
            return list(torch.from_numpy(packed).to(self.device).split([len(p) for p in pieces]))
        if self._stage_done is not None:
            self._stage_done.synchronize()
        if self._stage.numel() < packed.size:
            self._stage = torch.empty(2 * packed.size, dtype=torch.int64).pin_memory()
        stage = self._stage[: packed.size]
        stage.numpy()[:] = packed
        on_device = stage.to(self.device, non_blocking=True)
        self._stage_done = torch.cuda.Event()
        self._stage_done.record()
        return list(on_device.split([len(p) for p in pieces]))

    @staticmethod
    def prompt_scoring(plan: SchedulerOutput) -> PromptScoring | None:
        """The positions of this step whose logits prompt logprobs need, or None when no request wants any:
        for each request that asks, its positions from the first unscored one (earlier ones were scored
        before a preemption) to the second-to-last prompt token (the last one's logits sample)."""
        scoring = PromptScoring([], [], [], [])
        offset = 0  # the request's first row in the flattened batch
        for i, item in enumerate(plan.scheduled):
            request = item.request
            first = request.prompt_logprobs_from
            if first is not None:
                start = request.num_computed_tokens
                end = min(start + item.num_new_tokens, request.num_prompt_tokens - 1)
                assert first >= start, "positions to score are never served from the prefix cache"
                positions = range(first, end)
                scoring.rows.extend(offset + p - start for p in positions)
                scoring.targets.extend(request.prompt_token_ids[p + 1] for p in positions)
                scoring.num_top.extend([request.params.prompt_logprobs or 0] * len(positions))
                scoring.owners.extend([i] * len(positions))
            offset += item.num_new_tokens
        return scoring if scoring.rows else None

    def _score_prompts(
        self, hidden: torch.Tensor, scoring: PromptScoring, count: int
    ) -> list[list[TokenLogprob]]:
        """Per scheduled request, the prompt tokens `scoring` scores, unembedding a slice at a time."""
        out: list[list[TokenLogprob]] = [[] for _ in range(count)]
        rows = torch.tensor(scoring.rows, dtype=torch.int64).to(self.device, non_blocking=True)
        targets = torch.tensor(scoring.targets, dtype=torch.int64).to(self.device, non_blocking=True)
        for s in range(0, len(scoring.rows), PROMPT_LOGPROB_ROWS):
            e = s + PROMPT_LOGPROB_ROWS
            logits = self.model.logits(hidden[rows[s:e]])
            scored = score_tokens(logits, targets[s:e], scoring.num_top[s:e])
            for owner, token in zip(scoring.owners[s:e], scored, strict=True):
                out[owner].append(token)
        return out

    @staticmethod
    def read_back(token_ids: torch.Tensor) -> list[int]:
        """The sampled ids on the host: a device step's one device-to-host copy, and its one sync."""
        return token_ids.tolist()

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        scheduled = plan.scheduled
        scoring = self.prompt_scoring(plan)
        sampling = self._sampling_plan(plan) if scoring is None else None
        out_tokens: list[int | None] = [None] * len(scheduled)
        out_logprobs: list[TokenLogprob | None] = [None] * len(scheduled)
        out_errors: list[str | None] = [None] * len(scheduled)
        prompt_logprobs: list[list[TokenLogprob]] = []
        graphed = scoring is None and self.graphs is not None and self.graphs.applies(plan)
        inputs = None if graphed else self.prepare(plan, sampling.arrays if sampling is not None else None)
        sample_rows = list(range(len(scheduled))) if inputs is None else inputs.sample_rows
        requests = [scheduled[i].request for i in sample_rows]
        # The grammars' masks are computed on the masker's thread while the model runs; whatever happens,
        # the worker is done with the matchers before the scheduler advances them.
        masks = self.masker.start([r.constraint for r in requests])
        try:
            if inputs is None:
                assert self.graphs is not None
                logits = self.graphs.run(plan)
                sampling_arrays = self.upload(sampling.arrays) if sampling is not None else []
            else:
                sampling_arrays = inputs.extra
                if self._logits.shape[0] < len(sample_rows):
                    self._logits = self._logits.new_empty(len(sample_rows), self._logits.shape[1])
                model_inputs = (inputs.token_ids, inputs.meta, inputs.step_kv)
                if scoring is None:
                    logits = self.model(*model_inputs, inputs.logits_indices, self._logits, inputs.lora)
                else:
                    hidden = self.model.hidden(*model_inputs, inputs.lora)
                    logits = self.model.logits(hidden[inputs.logits_indices], self._logits)
                    prompt_logprobs = self._score_prompts(hidden, scoring, len(scheduled))
            if not sample_rows:  # only prompt chunks: the forward filled the cache, nothing to sample
                return RunnerOutput(out_tokens, out_logprobs, out_errors, prompt_logprobs)
            if sampling is not None:  # no grammar among these rows (the device sampler serves none)
                ids = self.read_back(DeviceSampler.sample(logits, sampling, sampling_arrays))
                for row, token in zip(sample_rows, ids, strict=True):
                    out_tokens[row] = token if token >= 0 else None
                    out_errors[row] = None if token >= 0 else _NO_TOKEN
                return RunnerOutput(out_tokens, out_logprobs, out_errors, prompt_logprobs)
            sampled = self.sampler.sample(
                logits,
                [r.params for r in requests],
                [r.output_token_ids for r in requests],
                [r.generator for r in requests],
                masks,
                [r.prompt_token_ids for r in requests],
            )
        finally:
            if masks is not None:
                masks.wait()
        for row, token, logprob, error in zip(
            sample_rows, sampled.token_ids, sampled.logprobs, sampled.errors, strict=True
        ):
            out_tokens[row] = token
            out_logprobs[row] = logprob
            out_errors[row] = error
        return RunnerOutput(out_tokens, out_logprobs, out_errors, prompt_logprobs)

    @torch.inference_mode()
    def launch(self, plan: SchedulerOutput, previous: LaunchedStep | None) -> LaunchedStep:
        """Queue a step whose sampling rows the device sampler serves, and its ids' copy to the host, without
        waiting for the device. The rows with a placeholder take their token from `previous` (the step that
        sampled it, still running, perhaps) on the device: a row that sampled nothing (-1) feeds token 0,
        its request fails in `previous`'s update and this row's token is dropped. :meth:`collect` reads the
        ids."""
        scheduled = plan.scheduled
        sampling = self._sampling_plan(plan)
        graphed = sampling is not None and self.graphs is not None and self.graphs.applies(plan)
        dst, src = [], []  # the placeholders' token positions here, and their tokens' indices in previous
        index = previous.index_of() if previous is not None else {}
        offset = 0
        for i, item in enumerate(scheduled):
            if item.request.num_pending_tokens:
                assert item.num_new_tokens == 1, "a placeholder is a decode's one token"
                dst.append(i if graphed else offset)
                src.append(index[item.request.request_id])
            offset += item.num_new_tokens
        feed = [np.array(dst, dtype=np.int64), np.array(src, dtype=np.int64)]
        arrays = (sampling.arrays if sampling is not None else []) + feed
        if graphed:
            assert self.graphs is not None
            assert sampling is not None
            uploaded = self.upload(arrays)
            dst_t, src_t = uploaded[-2:]
            fed = None
            if dst:
                assert previous is not None
                fed = (dst_t, previous.token_ids.index_select(0, src_t).clamp_(min=0))
            logits = self.graphs.run(plan, fed)
            sample_rows = list(range(len(scheduled)))
        else:
            inputs = self.prepare(plan, arrays)
            uploaded, sample_rows = inputs.extra, inputs.sample_rows
            dst_t, src_t = uploaded[-2:]
            if dst:
                assert previous is not None
                tokens = previous.token_ids.index_select(0, src_t).clamp_(min=0)
                inputs.token_ids.index_copy_(0, dst_t, tokens)
            logits = None
            if sample_rows:
                if self._logits.shape[0] < len(sample_rows):
                    self._logits = self._logits.new_empty(len(sample_rows), self._logits.shape[1])
                model_inputs = (inputs.token_ids, inputs.meta, inputs.step_kv)
                logits = self.model(*model_inputs, inputs.logits_indices, self._logits, inputs.lora)
            else:  # only prompt chunks: the forward fills the cache, nothing samples
                self.model.hidden(inputs.token_ids, inputs.meta, inputs.step_kv, inputs.lora)
        if logits is None:
            ids = torch.empty(0, dtype=torch.int64, device=self.device)
        else:
            assert sampling is not None, "the engine launches only steps the device sampler serves"
            ids = DeviceSampler.sample(logits, sampling, uploaded[:-2])
        if self.device.type != "cuda":
            return LaunchedStep(plan, sample_rows, ids, ids, None)
        if not self._host_ids:
            size = max(self.config.max_num_seqs, 1)
            self._host_ids = [torch.empty(size, dtype=torch.int64).pin_memory() for _ in range(2)]
        host = self._host_ids[self._launches % 2][: ids.shape[0]]
        self._launches += 1
        host.copy_(ids, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return LaunchedStep(plan, sample_rows, ids, host, copied)

    def collect(self, step: LaunchedStep) -> RunnerOutput:
        """A launched step's result: waits for its ids' copy to the host (not for any step queued after)."""
        n = len(step.plan.scheduled)
        out_tokens: list[int | None] = [None] * n
        out_errors: list[str | None] = [None] * n
        if step.sample_rows:
            if step.copied is not None:
                step.copied.synchronize()
            for row, token in zip(step.sample_rows, self.read_back(step.host_ids), strict=True):
                out_tokens[row] = token if token >= 0 else None
                out_errors[row] = None if token >= 0 else _NO_TOKEN
        return RunnerOutput(out_tokens, [None] * n, out_errors)

    def _sampling_plan(self, plan: SchedulerOutput) -> SamplingPlan | None:
        """The device sampler's plan for this step's sampling requests, or None for the host sampler: device
        sampling off, no request samples, or one asks for what only the host sampler does."""
        if not self.device_sampling:
            return None
        requests = [item.request for item in plan.scheduled if item.samples]
        if not requests or not all(supports(r.params, r.constraint) for r in requests):
            return None
        return self.device_sampler.plan(
            [r.params for r in requests],
            [r.output_token_ids for r in requests],
            [r.prompt_token_ids for r in requests],
            self.model.config.vocab_size,
            [r.num_pending_tokens for r in requests],
        )
