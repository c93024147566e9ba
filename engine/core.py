"""The engine: requests come and go at any step and share one batched forward.

:class:`EngineCore` is synchronous and single-owner: `add_request`, `abort` and `step` are called from one
thread (:mod:`engine.thread` runs it on a thread of its own for the server). A step is schedule, execute,
update: the scheduler decides and keeps the books, the runner computes, the scheduler applies the result.

The overlapped loop (`EngineConfig.async_scheduling`) keeps a GPU busy through the host's part of a step: it
schedules and launches step n+1 before reading step n's tokens, whose ids stay on the device and feed step
n+1's inputs there; the host then reads step n's tokens, checks stops and limits and hands out the outputs
while the device computes step n+1. A request that step n ends (a stop token or string, its length) is then
detected one step late: the token step n+1 sampled for it is dropped and never reaches the client, and the
KV it wrote is freed with the request's blocks. Only steps whose every request :func:`overlaps` run this
way (sampled on the device, no grammar, no penalties, no prompt logprobs); while any request in flight needs
the host between its tokens, the loop drains the step in flight and runs in the plain order.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.constraint import GrammarConstraint, grammar_problem
from engine.device_sampler import overlaps
from engine.kv_cache import KVCacheManager
from engine.request import (
    LoraAdapter,
    LoraNotFound,
    LoraRefused,
    Request,
    RequestOutput,
    RequestRejected,
    SamplingParams,
)
from engine.runner import LaunchedStep, ModelRunner
from engine.sampler import check_params_for_vocab, make_generator
from engine.scheduler import Scheduler
from model.gpt_oss import GptOss
from model.lora import Update

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """The engine's state after a step: a frozen snapshot that any thread may read without a lock."""

    num_running: int
    num_waiting: int
    # Per pool: the full-attention pool holds a request's whole context, the sliding pool only its window.
    kv_full_blocks_used: int
    kv_full_blocks_total: int
    kv_sliding_blocks_used: int
    kv_sliding_blocks_total: int
    prefix_cache_hit_rate: float
    num_steps: int
    num_preemptions: int
    tokens_per_step: float  # mean over the recent steps
    # Steps that raised as a whole (every request in them failed), and how many of those came in a row since
    # the last step that succeeded: a count that keeps growing means the device or the model is broken.
    num_failed_steps: int = 0
    num_failed_steps_in_a_row: int = 0

    @property
    def kv_blocks_used(self) -> int:
        return self.kv_full_blocks_used + self.kv_sliding_blocks_used

    @property
    def kv_full_usage(self) -> float:
        return self.kv_full_blocks_used / self.kv_full_blocks_total if self.kv_full_blocks_total else 0.0

    @property
    def kv_sliding_usage(self) -> float:
        total = self.kv_sliding_blocks_total
        return self.kv_sliding_blocks_used / total if total else 0.0

    @property
    def kv_cache_usage(self) -> float:
        """The fuller of the two pools: admission stops when either runs out, so the sum over both (which
        read 0.5 while the full-attention pool was exhausted) says nothing about the room left."""
        return max(self.kv_full_usage, self.kv_sliding_usage)


class EngineCore:
    def __init__(
        self,
        model: GptOss,
        config: EngineConfig | None = None,
        *,
        token_bytes: Callable[[int], bytes] | None = None,
    ) -> None:
        """`token_bytes` maps a token id to its bytes; it is needed only for stop strings."""
        self.config = config or EngineConfig()
        self.max_model_len = self.config.max_model_len or model.config.max_position_embeddings
        self.vocab_size = model.config.vocab_size
        self.token_bytes = token_bytes
        if self.config.max_loras:  # before the runner sizes the KV cache from what memory is left
            model.enable_lora(
                self.config.max_loras, self.config.max_lora_rank, experts=self.config.lora_experts
            )
        self.runner = ModelRunner(model, self.config, self.max_model_len)
        wanted = self.config.async_scheduling
        if wanted is None:  # where there is a device to keep busy and it samples
            wanted = self.runner.device_sampling and self.runner.device.type == "cuda"
        self.async_scheduling = wanted
        if self.async_scheduling and not self.runner.device_sampling:
            raise ValueError(
                "the overlapped loop (async_scheduling) needs the device sampler (device_sampling)"
            )
        full_tokens = self.runner.blocks.num_full * self.config.block_size
        if full_tokens < self.max_model_len:
            # Refused rather than clamped (as vLLM does): a server that advertises a context it cannot hold
            # refuses long requests it claimed to take, and a silent clamp hides a misconfigured deployment.
            raise ValueError(
                f"the KV cache holds {full_tokens} tokens of full attention ({self.runner.blocks.num_full} "
                f"blocks of {self.config.block_size}), fewer than one request of max_model_len "
                f"{self.max_model_len} needs; lower max_model_len to at most {full_tokens}, or give the KV "
                "cache more memory (kv_cache_memory, gpu_memory_utilization)"
            )
        kv = KVCacheManager(
            block_size=self.config.block_size,
            num_full_blocks=self.runner.blocks.num_full,
            num_sliding_blocks=self.runner.blocks.num_sliding,
            window=model.config.sliding_window,
            enable_prefix_caching=self.config.enable_prefix_caching,
        )
        self.scheduler = Scheduler(
            kv,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            token_bytes=token_bytes,
        )
        # The loaded adapters by name. Replaced, never changed in place, so another thread (the server
        # resolving a request's model) always reads a whole mapping.
        self.loras: dict[str, LoraAdapter] = {}
        self._next_lora_id = 1
        self._aborted: list[str] = []
        # The overlapped loop's step launched and not yet read (see the module's docstring).
        self._in_flight: LaunchedStep | None = None
        self._step_tokens: deque[int] = deque(maxlen=100)
        self._num_failed_steps = 0
        self._num_failed_steps_in_a_row = 0
        self._stats = self._snapshot()

    @property
    def model(self) -> GptOss:
        return self.runner.model

    # -- requests --------------------------------------------------------------------------------------------

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Refuse what can never run; safe to call from any thread (reads only configuration)."""
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestRejected("the prompt is empty", "prompt")
        if n >= self.max_model_len:
            raise RequestRejected(
                f"the prompt has {n} tokens; this model's context is {self.max_model_len} tokens, "
                "and at least one must be left for the output",
                "prompt",
            )
        if any(not 0 <= t < self.vocab_size for t in prompt_token_ids):
            raise RequestRejected(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        need = min(self.max_model_len, n + params.max_tokens)
        if -(-need // self.config.block_size) > self.runner.blocks.num_full:
            raise RequestRejected(
                f"the request needs {need} tokens of KV cache, more than the whole cache holds", "max_tokens"
            )
        if params.stop and self.token_bytes is None:
            raise RequestRejected("stop strings need an engine built with token_bytes", "stop")
        # Again here: SamplingParams' fields can change after construction, and a value the step cannot
        # compute would fail every request sharing the step with this one.
        params.validate()
        check_params_for_vocab(params, self.vocab_size)
        if params.grammar is not None and (problem := grammar_problem(params.grammar)) is not None:
            raise RequestRejected(f"the output constraint cannot be enforced: {problem}", "grammar")
        if params.lora_id is not None:
            self.check_lora(params.lora_id)

    def check_lora(self, lora_id: int) -> None:
        """`LoraNotFound` (field ``lora_id``) unless the adapter `lora_id` is loaded: one unloaded since a
        request named it. Safe from any thread (one read of the mapping, which is replaced, never edited)."""
        if self._lora_by_id(lora_id) is None:
            raise LoraNotFound(f"the LoRA adapter {lora_id} is not loaded", "lora_id")

    def _lora_by_id(self, lora_id: int) -> LoraAdapter | None:
        return next((a for a in self.loras.values() if a.lora_id == lora_id), None)

    # -- LoRA adapters ---------------------------------------------------------------------------------------
    # Both change the model's adapter stacks: call them between steps (the engine thread runs them there).

    def load_lora(self, name: str, updates: list[Update], path: str = "") -> LoraAdapter:
        """Serve the adapter `updates` (:func:`model.lora.read_adapter`) under `name`, in a free slot.

        Raises :class:`LoraRefused` (adapters off, name taken, no free slot) or
        :class:`model.lora.AdapterError` (one the model's stacks cannot hold) with nothing changed."""
        if not self.config.max_loras:
            raise LoraRefused("this server keeps no room for LoRA adapters (start it with --max-loras)")
        if name in self.loras:
            raise LoraRefused(f"a LoRA adapter named {name!r} is already loaded", "lora_name")
        used = {a.slot for a in self.loras.values()}
        free = [s for s in range(1, self.config.max_loras + 1) if s not in used]
        if not free:
            raise LoraRefused(
                f"{len(used)} LoRA adapters are loaded, as many as this server holds (--max-loras "
                f"{self.config.max_loras}); unload one first",
                "lora_name",
            )
        self.model.set_lora(free[0], updates)
        adapter = LoraAdapter(name, self._next_lora_id, free[0], path)
        self._next_lora_id += 1
        self.loras = {**self.loras, name: adapter}
        logger.info("LoRA adapter %s loaded from %s into slot %d", name, path or "memory", adapter.slot)
        return adapter

    def unload_lora(self, name: str) -> None:
        """Stop serving the adapter `name`. Refused (:class:`LoraRefused`) while requests run with it: they
        keep its slot until they end, and a later adapter must not take the slot under them."""
        adapter = self.loras.get(name)
        if adapter is None:
            raise LoraNotFound(f"no LoRA adapter named {name!r} is loaded", "lora_name")
        users = [r for r in self.scheduler.requests.values() if r.params.lora_id == adapter.lora_id]
        if users:
            raise LoraRefused(
                f"{len(users)} requests are running with the LoRA adapter {name!r}; unload it once they end",
                "lora_name",
            )
        self.loras = {n: a for n, a in self.loras.items() if n != name}
        self.model.clear_lora(adapter.slot)
        logger.info("LoRA adapter %s unloaded from slot %d", name, adapter.slot)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.scheduler.requests:
            raise RequestRejected(f"request id {request_id!r} is already in use", "request_id")
        self.check(prompt_token_ids, params)
        generator = make_generator(params.seed, self.model.device) if params.seed is not None else None
        request = Request(
            request_id,
            list(prompt_token_ids),
            params,
            arrival_time=time.perf_counter(),
            max_total_tokens=min(self.max_model_len, len(prompt_token_ids) + params.max_tokens),
            generator=generator,
            constraint=None if params.grammar is None else GrammarConstraint(params.grammar),
        )
        if params.lora_id is not None:
            adapter = self._lora_by_id(params.lora_id)
            assert adapter is not None, "checked above"
            request.lora_slot = adapter.slot
        self.scheduler.add(request)
        self._stats = self._snapshot()

    def abort(self, request_id: str) -> None:
        """End a request at the next step (its output then says `abort`). Unknown ids are ignored."""
        self._aborted.append(request_id)

    def has_unfinished(self) -> bool:
        """Requests in flight, or a step whose tokens are still to be read (the next step reads them)."""
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # -- the step --------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs = self._drain_aborts()
        previous, self._in_flight = self._in_flight, None
        overlap = self.async_scheduling and all(
            overlaps(r.params, r.constraint) for r in self.scheduler.requests.values()
        )
        if previous is not None and not overlap:
            # Drained: the coming step needs every token on the host before it is planned.
            outputs += self._read(previous)
            previous = None
        plan = self.scheduler.schedule()
        if plan.scheduled:
            if overlap:
                self._in_flight = self.runner.launch(plan, previous)
                self.scheduler.advance(plan)
            else:
                outputs += self.scheduler.update(plan, self.runner.execute(plan))
            self._step_tokens.append(plan.num_tokens)
            self._num_failed_steps_in_a_row = 0
        if previous is not None:  # read while the device computes the step just launched
            outputs += self._read(previous)
        self._stats = self._snapshot()
        return outputs

    def _read(self, launched: LaunchedStep) -> list[RequestOutput]:
        """Apply a launched step's tokens, once on the host."""
        return self.scheduler.update(launched.plan, self.runner.collect(launched), advanced=True)

    def _drain_aborts(self) -> list[RequestOutput]:
        ids, self._aborted = self._aborted, []
        outputs = [self.scheduler.abort(rid) for rid in dict.fromkeys(ids)]
        return [o for o in outputs if o is not None]

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request in flight with `abort` and `message` (after a step that raised as a whole)."""
        self._num_failed_steps += 1
        self._num_failed_steps_in_a_row += 1
        self._in_flight = None  # its requests end here
        outputs = self.scheduler.fail_all(message)
        self._stats = self._snapshot()
        return outputs

    # -- statistics ------------------------------------------------------------------------------------------

    def _snapshot(self) -> EngineStats:
        kv, scheduler, steps = self.scheduler.kv, self.scheduler, self._step_tokens
        return EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_full_blocks_used=kv.full.num_used,
            kv_full_blocks_total=kv.full.num_blocks,
            kv_sliding_blocks_used=kv.sliding.num_used,
            kv_sliding_blocks_total=kv.sliding.num_blocks,
            prefix_cache_hit_rate=kv.prefix_hit_rate,
            num_steps=scheduler.num_steps,
            num_preemptions=scheduler.num_preemptions,
            tokens_per_step=sum(steps) / len(steps) if steps else 0.0,
            num_failed_steps=self._num_failed_steps,
            num_failed_steps_in_a_row=self._num_failed_steps_in_a_row,
        )

    def stats(self) -> EngineStats:
        """The snapshot taken after the last step (any thread)."""
        return self._stats
