"""Who runs this step, with how many tokens, and what a step's result does to each request.

One rule for everything: a request's `num_computed_tokens` catches up with its `num_tokens`, at most the
remaining token budget at a time. A prefill, a chunk of a long prompt, and a decode step are the same case, so
chunked prefill and decode share a step. Running requests go first, oldest first; waiting requests are then
admitted in arrival order (first come, first served: one that does not fit blocks those behind it). When the
KV blocks run out, the newest running request is preempted: its blocks are freed and it goes back to the
front of the queue, to be recomputed later (its computed blocks usually come back from the prefix cache).
The oldest request is never preempted for a newer one, so every request finishes.

The scheduler owns the requests, the queues and the KV cache's books, and it is the only writer of a
request's counters: :meth:`Scheduler.schedule` decides, the runner computes from the plan without changing a
request, and :meth:`Scheduler.update` applies the runner's result (new tokens, stop checks, finished
requests). It never touches a tensor, so it is tested on a CPU with a hand-made runner result.

The overlapped loop (engine.core) schedules a step before the previous step's sampled tokens are on the
host: :meth:`Scheduler.advance` takes a launched step's work as done, giving each request that samples in it
a placeholder (`Request.num_pending_tokens`) that counts as one of its tokens, so the next schedule gives it
its decode; :meth:`Scheduler.update` then fills the placeholder with the token read back. A request that ends
in that update (a stop token or string, its length) was already scheduled again: the token of that later
step is dropped when it comes back, and the blocks it wrote into are freed with the request's, as usual.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.kv_cache import KVCacheManager
from engine.request import FinishReason, Request, RequestOutput, RequestStatus, TokenLogprob

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledRequest:
    request: Request  # read-only for everyone but the scheduler
    num_new_tokens: int
    row: int  # the request's row in the block-table arrays
    # Whether the step samples the request's next token: its new tokens reach the end of those it has (a
    # decode, or a prompt's last chunk); a prompt chunk before that only fills the cache.
    samples: bool = True


@dataclass(slots=True)
class SchedulerOutput:
    """One step's plan: who runs with how many tokens, and the block tables they read."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # The block-table arrays of the two groups (rows indexed by ScheduledRequest.row), valid for this step.
    full_tables: np.ndarray | None = None
    sliding_tables: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


@dataclass(slots=True)
class RunnerOutput:
    """Per scheduled request, in order: the sampled token (None while its prompt is still being filled, or
    when the request failed alone in this step: then `errors` says why, and the others are unaffected)."""

    token_ids: list[int | None]
    logprobs: list[TokenLogprob | None]
    errors: list[str | None] = field(default_factory=list)  # empty: no request failed
    # Per scheduled request: the prompt tokens this step scored, in order, from the request's first unscored
    # one (see Request.prompt_logprobs_from); empty: none did.
    prompt_logprobs: list[list[TokenLogprob]] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        token_bytes: Callable[[int], bytes] | None = None,
    ) -> None:
        """`token_bytes` maps a token id to its bytes, for stop strings."""
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.token_bytes = token_bytes
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_steps = 0
        self.num_preemptions = 0

    # -- requests -------------------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        assert request.request_id not in self.requests, "the engine checks ids before adding"
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now; its last output, or None for an id not in flight."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        return self._finish(request, FinishReason.ABORT)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request in flight with `abort` and `message` (after a failed step)."""
        return [self._fail(request, message) for request in list(self.requests.values())]

    def _fail(self, request: Request, message: str, output: RequestOutput | None = None) -> RequestOutput:
        """End one request with `abort` and `message`: something it alone brought failed (its processors, its
        parameters, its stop strings), or the whole step did."""
        output = self._finish(request, FinishReason.ABORT, output)
        output.error = message
        return output

    # -- the step -------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        rows = self.kv.rows

        # Runs once per running request per step: the names it uses are bound locally.
        running, scheduled, allocate = self.running, out.scheduled, self.kv.allocate_slots
        index = 0
        while index < len(running) and budget > 0:
            request = running[index]
            pending = request.num_pending_tokens
            known = len(request.all_token_ids) + pending
            if pending and known >= request.max_total_tokens:
                index += 1  # its placeholder is its last token: the update that fills it ends the request
                continue
            num_new = min(known - request.num_computed_tokens, budget)
            while not allocate(request, num_new):
                victim = running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                samples = request.num_computed_tokens + num_new == known
                scheduled.append(ScheduledRequest(request, num_new, rows[request.request_id], samples))
                budget -= num_new
                index += 1
                continue
            break  # the request itself was preempted: nothing newer is left to run

        # No admissions in a step that had to preempt: the pool is full.
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            # Prompt logprobs need the logits of the positions not yet scored: those are recomputed even
            # when the prefix cache holds them.
            prefix = self.kv.find_cached_prefix(request, request.prompt_logprobs_from)
            num_new = min(request.num_tokens - prefix.num_tokens, budget)
            assert request.num_computed_tokens == request.num_pending_tokens == 0
            if not self.kv.allocate_slots(request, num_new, prefix):
                break
            self.waiting.popleft()
            if request.num_cached_tokens < 0:  # first admission: report the prompt's cache hit
                request.num_cached_tokens = prefix.num_tokens
                self.kv.note_prefix_lookup(request.num_prompt_tokens, prefix.num_tokens)
            request.num_computed_tokens = prefix.num_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            samples = prefix.num_tokens + num_new == request.num_tokens
            out.scheduled.append(ScheduledRequest(request, num_new, rows[request.request_id], samples))
            budget -= num_new
        self.num_preemptions += len(out.preempted)
        out.full_tables = self.kv.full_array.array
        out.sliding_tables = self.kv.sliding_array.array
        return out

    def advance(self, plan: SchedulerOutput) -> None:
        """Take a launched step's work as done before its result is read (the overlapped loop): each
        request's computed tokens move past the step's, and each request that samples gets a placeholder
        for the token the device sampled, so the next :meth:`schedule` gives it its decode. The step's
        :meth:`update` follows, with `advanced` set."""
        for item in plan.scheduled:
            request = item.request
            request.num_computed_tokens += item.num_new_tokens
            if item.samples:
                # Two for a moment: this step's, and the previous step's until its update, next.
                request.num_pending_tokens += 1

    def update(
        self, plan: SchedulerOutput, result: RunnerOutput, *, advanced: bool = False
    ) -> list[RequestOutput]:
        """Apply a step's result: advance each request's counters (unless :meth:`advance` did), add its
        token, end the finished ones.

        After :meth:`advance` a request may have changed since its step was scheduled: ended (aborted, or
        finished by the previous step's update; its token here is dropped) or preempted by the next
        schedule (its token is kept: it was computed from its cache before the blocks were freed)."""
        if plan.scheduled:
            self.num_steps += 1
        now = time.perf_counter()
        outputs = []
        errors = result.errors or [None] * len(plan.scheduled)
        scored = result.prompt_logprobs or [[]] * len(plan.scheduled)
        for item, token, logprob, error, prompt_logprobs in zip(
            plan.scheduled, result.token_ids, result.logprobs, errors, scored, strict=True
        ):
            request = item.request
            if advanced:
                if request.status is RequestStatus.FINISHED:
                    continue  # ended while its step ran: the extra token never reaches the client
                if item.samples:
                    request.num_pending_tokens -= 1
            if error is not None:
                logger.warning("request %s failed alone in the step: %s", request.request_id, error)
                outputs.append(self._fail(request, error))
                continue
            if not advanced:
                request.num_computed_tokens += item.num_new_tokens
            request.prompt_logprobs += prompt_logprobs
            # A request preempted since its step was launched holds no blocks to register.
            holds_blocks = request.status is RequestStatus.RUNNING
            if token is None:  # a prompt chunk: only the cache was filled
                if holds_blocks:
                    self.kv.register_computed(request)
                continue
            request.append_output(token)
            if request.constraint is not None:
                request.constraint.advance(token)
            if request.first_token_time is None:
                request.first_token_time = now
            if holds_blocks:
                self.kv.register_computed(request)
            output = RequestOutput(
                request.request_id,
                [token],
                None if request.params.logprobs is None or logprob is None else [logprob],
                num_prompt_tokens=request.num_prompt_tokens,
                num_cached_tokens=max(request.num_cached_tokens, 0),
            )
            if request.params.prompt_logprobs is not None and len(request.output_token_ids) == 1:
                assert len(request.prompt_logprobs) == request.num_prompt_tokens, "the prefill scores all"
                output.prompt_logprobs = list(request.prompt_logprobs)
            try:
                reason = self._stop_check(request, token)
            except Exception as error:  # token_bytes or a stop string: this request's own business
                logger.exception("request %s: the stop check failed", request.request_id)
                outputs.append(
                    self._fail(request, f"the stop check failed: {type(error).__name__}: {error}", output)
                )
                continue
            if reason is not None:
                self._finish(request, reason, output)
            outputs.append(output)
        return outputs

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _stop_check(self, request: Request, token: int) -> FinishReason | None:
        params = request.params
        # Short of min_tokens outputs (this one counted, as vLLM does) nothing but its length stops the
        # request; the sampler keeps the stop tokens out until then.
        may_stop = len(request.output_token_ids) >= params.min_tokens
        if may_stop and token in params.stop_token_ids:
            request.stop_reason = token
            return FinishReason.STOP
        if params.stop:
            assert self.token_bytes is not None, "the engine refuses stop strings without token_bytes"
            new = self.token_bytes(token)
            request.output_bytes += new
            for stop in params.stop if may_stop else ():
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
        """Take a finished or aborted request out of the queues, free its blocks and say how it ended."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        self.kv.free(request)
        del self.requests[request.request_id]
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        if output is None:
            output = RequestOutput(
                request.request_id,
                [],
                num_prompt_tokens=request.num_prompt_tokens,
                num_cached_tokens=max(request.num_cached_tokens, 0),
            )
        output.finish_reason = reason
        output.stop_reason = request.stop_reason
        now = time.perf_counter()
        output.latency = now - request.arrival_time
        if request.first_token_time is not None:
            output.time_to_first_token = request.first_token_time - request.arrival_time
        return output
