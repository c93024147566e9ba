"""Who runs this step, and with how many tokens.

One rule for everything: a request's `num_computed_tokens` catches up with its `num_tokens`, at most the
remaining token budget at a time. A prefill, a chunk of a long prompt, and a decode step are the same case, so
chunked prefill and decode share a step. Running requests go first, oldest first; waiting requests are then
admitted in arrival order (first come, first served: one that does not fit blocks those behind it). When the
KV blocks run out, the newest running request is preempted: its blocks are freed and it goes back to the
front of the queue, to be recomputed later (its computed blocks usually come back from the prefix cache).
The oldest request is never preempted for a newer one, so every request finishes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from model.kv_cache import KVCacheManager
from model.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        # Runs once per running request per step: the names it uses are bound locally.
        running, scheduled, allocate = self.running, out.scheduled, self.kv.allocate_slots
        index = 0
        while index < len(running) and budget > 0:
            request = running[index]
            num_new = min(len(request.all_token_ids) - request.num_computed_tokens, budget)
            while not allocate(request, num_new):
                victim = running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
                index += 1
                continue
            break  # the request itself was preempted: nothing newer is left to run

        # No admissions in a step that had to preempt: the pool is full.
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            prefix = self.kv.find_cached_prefix(request)
            num_new = min(request.num_tokens - prefix.num_tokens, budget)
            assert request.num_computed_tokens == 0
            if not self.kv.allocate_slots(request, num_new, prefix):
                break
            self.waiting.popleft()
            if request.num_cached_tokens < 0:  # first admission: report the prompt's cache hit
                request.num_cached_tokens = prefix.num_tokens
                self.kv.note_prefix_lookup(request.num_prompt_tokens, prefix.num_tokens)
            request.num_computed_tokens = prefix.num_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        return out

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request) -> None:
        """Take a finished or aborted request out of the queues and free its blocks."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.FINISHED
