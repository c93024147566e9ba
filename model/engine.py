"""The engine: requests come and go at any step and share one batched forward.

`Engine` is synchronous and single-owner: `add_request`, `abort` and `step` are called from one thread.
`step()` is schedule, run, update. `EngineThread` runs an engine on a thread of its own for the server:
commands reach it through a queue and each request's outputs go to that request's callback.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from model.gpt_oss import AttentionMetadata, GptOss
from model.kv_cache import KVCacheManager, PagedKVCache, bytes_per_block
from model.request import FinishReason, Request, RequestOutput, SamplingParams, SamplingParamsError
from model.runner import ModelRunner
from model.sampler import Sampler, check_params_for_vocab, make_generator
from model.scheduler import Scheduler

logger = logging.getLogger(__name__)

CPU_KV_CACHE_MEMORY = 1 << 30  # bytes of KV cache on a CPU unless configured


class RequestRejected(ValueError):
    """A request the engine cannot take (too long, bad token ids, duplicate id); the message says why."""


@dataclass(slots=True)
class EngineConfig:
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: on CUDA the free memory after a warm-up, else 1 GiB
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    # Full-attention blocks, overriding the memory budget (tests and tuning).
    num_kv_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.block_size < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and block_size must be positive")


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_hit_rate: float
    num_steps: int
    num_preemptions: int
    tokens_per_step: float  # mean over the recent steps
    time_to_first_token: list[float] = field(default_factory=list)  # seconds, recent finished requests
    time_per_output_token: list[float] = field(default_factory=list)

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class Engine:
    def __init__(
        self,
        model: GptOss,
        config: EngineConfig | None = None,
        *,
        token_bytes: Callable[[int], bytes] | None = None,
    ) -> None:
        """`token_bytes` maps a token id to its bytes; it is needed only for stop strings."""
        self.model = model
        self.config = config or EngineConfig()
        mc = model.config
        self.max_model_len = self.config.max_model_len or mc.max_position_embeddings
        self.vocab_size = mc.vocab_size
        self.token_bytes = token_bytes
        bs = self.config.block_size
        dtype = model.dtype

        # The sliding group needs at most (window + one step's tokens) per running request, and gets at least
        # an eighth of the budget so that windows survive for prefix reuse; the rest is full-attention.
        window_blocks = -(-(mc.sliding_window - 1) // bs) + 2
        min_sliding = self.config.max_num_seqs * window_blocks + -(-self.config.max_num_batched_tokens // bs)
        full_bytes = bytes_per_block(mc, bs, dtype, sliding=False)
        sliding_bytes = bytes_per_block(mc, bs, dtype, sliding=True)
        if self.config.num_kv_blocks is not None:
            num_full = self.config.num_kv_blocks
            num_sliding = max(min_sliding, num_full // 8)
        else:
            budget = self._kv_budget()
            num_sliding = max(min_sliding, budget // 8 // max(sliding_bytes, 1)) if sliding_bytes else 1
            num_full = (budget - num_sliding * sliding_bytes) // full_bytes if full_bytes else 1
        if num_full < 1:
            raise ValueError(
                f"the KV cache budget leaves no full-attention blocks beside {num_sliding} sliding ones; "
                "raise kv_cache_memory or lower max_num_seqs / max_num_batched_tokens"
            )
        self.kv = KVCacheManager(
            block_size=bs,
            num_full_blocks=num_full,
            num_sliding_blocks=num_sliding,
            window=mc.sliding_window,
            enable_prefix_caching=self.config.enable_prefix_caching,
        )
        cache = PagedKVCache(
            mc,
            block_size=bs,
            num_full_blocks=num_full,
            num_sliding_blocks=num_sliding,
            dtype=dtype,
            device=model.device,
        )
        self.scheduler = Scheduler(
            self.kv,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
        )
        self.runner = ModelRunner(model, self.kv, cache, Sampler())
        self.requests: dict[str, Request] = {}
        self._aborted: list[str] = []
        self._num_steps = 0
        self._num_preemptions = 0
        self._step_tokens: deque[int] = deque(maxlen=100)
        self._ttft: deque[float] = deque(maxlen=1000)
        self._tpot: deque[float] = deque(maxlen=1000)
        logger.info(
            "KV cache: %d full-attention and %d sliding-window blocks of %d tokens (%.0f MiB), context %d",
            num_full,
            num_sliding,
            bs,
            (num_full * full_bytes + num_sliding * sliding_bytes) / 2**20,
            self.max_model_len,
        )

    def _kv_budget(self) -> int:
        if self.config.kv_cache_memory is not None:
            return self.config.kv_cache_memory
        device = self.model.device
        if device.type != "cuda":
            return CPU_KV_CACHE_MEMORY
        # What a warm-up forward leaves free, less a safety margin.
        self._warm_up()
        free, total = torch.cuda.mem_get_info(device)
        reserve = total * (1 - self.config.gpu_memory_utilization)
        return max(0, int(free - reserve))

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """One forward of a full token budget without a cache, so its activations are counted as used."""
        n = min(self.config.max_num_batched_tokens, self.max_model_len)
        meta = AttentionMetadata.build([n], device=self.model.device)
        self.model(torch.zeros(n, dtype=torch.int64, device=self.model.device), meta)
        torch.cuda.synchronize(self.model.device)

    # -- requests -------------------------------------------------------------------------------------------

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Refuse what can never run; safe to call from any thread (reads only configuration)."""
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestRejected("the prompt is empty")
        if n >= self.max_model_len:
            raise RequestRejected(
                f"the prompt has {n} tokens; this model's context is {self.max_model_len} tokens, "
                "and at least one must be left for the output"
            )
        if any(not 0 <= t < self.vocab_size for t in prompt_token_ids):
            raise RequestRejected(f"prompt token ids must be in [0, {self.vocab_size})")
        need = min(self.max_model_len, n + params.max_tokens)
        if -(-need // self.kv.block_size) > self.kv.full.num_blocks:
            raise RequestRejected(
                f"the request needs {need} tokens of KV cache, more than the whole cache holds"
            )
        if params.stop and self.token_bytes is None:
            raise RequestRejected("stop strings need an engine built with token_bytes")
        try:
            check_params_for_vocab(params, self.vocab_size)
        except SamplingParamsError as error:
            raise RequestRejected(str(error)) from error

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise RequestRejected(f"request id {request_id!r} is already in use")
        self.check(prompt_token_ids, params)
        generator = make_generator(params.seed, self.model.device) if params.seed is not None else None
        request = Request(
            request_id,
            list(prompt_token_ids),
            params,
            arrival_time=time.perf_counter(),
            max_total_tokens=min(self.max_model_len, len(prompt_token_ids) + params.max_tokens),
            generator=generator,
        )
        self.requests[request_id] = request
        self.scheduler.add(request)

    def abort(self, request_id: str) -> None:
        """End a request at the next step (its output then says `abort`). Unknown ids are ignored."""
        if request_id in self.requests:
            self._aborted.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the step -------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs = [self._finish(self.requests[rid], FinishReason.ABORT) for rid in self._drain_aborts()]
        plan = self.scheduler.schedule()
        self._num_preemptions += len(plan.preempted)
        if not plan.scheduled:
            return outputs
        result = self.runner.execute(plan.scheduled)
        self._num_steps += 1
        self._step_tokens.append(plan.num_tokens)
        now = time.perf_counter()
        for item, token, logprob in zip(plan.scheduled, result.token_ids, result.logprobs, strict=True):
            request = item.request
            request.num_computed_tokens += item.num_new_tokens
            if token is None:
                self.kv.register_computed(request)
                continue
            request.append_output(token)
            if request.first_token_time is None:
                request.first_token_time = now
            self.kv.register_computed(request)
            reason = self._stop_check(request, token)
            output = RequestOutput(
                request.request_id,
                [token],
                None if request.params.logprobs is None or logprob is None else [logprob],
                num_prompt_tokens=request.num_prompt_tokens,
                num_cached_tokens=max(request.num_cached_tokens, 0),
            )
            if reason is not None:
                self._finish(request, reason, output)
            outputs.append(output)
        return outputs

    def _drain_aborts(self) -> list[str]:
        ids, self._aborted = self._aborted, []
        return [rid for rid in dict.fromkeys(ids) if rid in self.requests]

    def _stop_check(self, request: Request, token: int) -> FinishReason | None:
        params = request.params
        if token in params.stop_token_ids:
            request.stop_reason = token
            return FinishReason.STOP
        if params.stop:
            assert self.token_bytes is not None
            new = self.token_bytes(token)
            request.output_bytes += new
            for stop in params.stop:
                encoded = stop.encode()
                tail = bytes(request.output_bytes[-(len(new) + len(encoded) - 1) :])
                if encoded in tail:
                    request.stop_reason = stop
                    return FinishReason.STOP
        if request.num_tokens >= request.max_total_tokens:
            return FinishReason.LENGTH
        return None

    def _finish(
        self, request: Request, reason: FinishReason, output: RequestOutput | None = None
    ) -> RequestOutput:
        self.scheduler.finish(request)
        del self.requests[request.request_id]
        request.finish_reason = reason
        now = time.perf_counter()
        if request.first_token_time is not None:
            self._ttft.append(request.first_token_time - request.arrival_time)
            if len(request.output_token_ids) > 1:
                self._tpot.append((now - request.first_token_time) / (len(request.output_token_ids) - 1))
        if output is None:
            output = RequestOutput(
                request.request_id,
                [],
                num_prompt_tokens=request.num_prompt_tokens,
                num_cached_tokens=max(request.num_cached_tokens, 0),
            )
        output.finish_reason = reason
        output.stop_reason = request.stop_reason
        return output

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request in flight with `abort` and `message` (after a failed step)."""
        outputs = []
        for request in list(self.requests.values()):
            output = self._finish(request, FinishReason.ABORT)
            output.error = message
            outputs.append(output)
        return outputs

    # -- statistics and conveniences ------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        used = self.kv.full.num_used + self.kv.sliding.num_used
        total = self.kv.full.num_blocks + self.kv.sliding.num_blocks
        steps = self._step_tokens
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=used,
            kv_blocks_total=total,
            prefix_cache_hit_rate=self.kv.prefix_hit_rate,
            num_steps=self._num_steps,
            num_preemptions=self._num_preemptions,
            tokens_per_step=sum(steps) / len(steps) if steps else 0.0,
            time_to_first_token=list(self._ttft),
            time_per_output_token=list(self._tpot),
        )

    def generate(
        self, prompts: Iterable[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[list[int]]:
        """Run prompts to completion (all queued at once) and return their output token ids, in order."""
        prompts = list(prompts)
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{self._num_steps}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, all_params, strict=True):
            self.add_request(rid, prompt, p)
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.request_id in tokens:
                    tokens[out.request_id].extend(out.new_token_ids)
        return [tokens[rid] for rid in ids]


OutputCallback = Callable[[RequestOutput], None]


class EngineThread:
    """Runs an `Engine` on its own thread. Thread-safe: any thread may add or abort requests.

    Each request's outputs are handed to its callback on the engine thread (the callback must be quick and
    must not block: an asyncio server passes `loop.call_soon_threadsafe`-based callbacks). If a step raises,
    every request in flight ends with `abort` and the error text, and the engine goes on serving.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[str, tuple]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._callbacks: dict[str, OutputCallback] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, callback: OutputCallback
    ) -> None:
        """Queue a request; raises `RequestRejected` at once for one that can never run."""
        self.engine.check(prompt_token_ids, params)
        self._commands.put(("add", (request_id, prompt_token_ids, params, callback)))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", (request_id,)))
        self._wake.set()

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._apply_commands()
            if not engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as error:  # a failed step must not take the server down with it
                logger.exception("engine step failed; aborting %d requests", len(engine.requests))
                outputs = engine.fail_all(f"engine error: {error}")
            for output in outputs:
                callback = self._callbacks.get(output.request_id)
                if output.finished:
                    self._callbacks.pop(output.request_id, None)
                if callback is not None:
                    callback(output)

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, args = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                request_id, prompt, params, callback = args
                try:
                    self.engine.add_request(request_id, prompt, params)
                except RequestRejected as error:
                    callback(
                        RequestOutput(request_id, [], finish_reason=FinishReason.ABORT, error=str(error))
                    )
                    continue
                self._callbacks[request_id] = callback
            else:
                self.engine.abort(args[0])
