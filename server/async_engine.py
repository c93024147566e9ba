"""The bridge between the asyncio server and the engine thread.

Each request gets its own asyncio queue; the engine thread's callback hands outputs over with
`loop.call_soon_threadsafe`, so the event loop never waits on the model. A consumer that goes away (a client
disconnect cancels its task) aborts its request in the engine, which frees its blocks at the next step.

The bound on requests in flight is kept by admission: `admit` checks the bound and takes the slots in one go
on the event loop (no await in between, so concurrent requests cannot all pass the check before any is
counted), and the `Admission` gives them back when its response ends, whether or not it ever started.

An admission also holds the LoRA adapters its requests run with, so that none is unloaded between the
admission and the engine thread's taking the request (the engine itself only sees requests it has taken):
`admit` checks and holds, and `unload_lora` checks and unloads, each under one lock, so either the
request finds its adapter gone (`LoraNotFound`, a 404) or the unload finds it held (`LoraRefused`, a 400).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from engine.core import EngineCore
from engine.request import LoraRefused, RequestOutput, SamplingParams
from engine.thread import EngineThread

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineFailure(RuntimeError):
    """The engine ended the request with an error (a failed step, or a refusal after queueing)."""


class ShuttingDown(EngineFailure):
    """The server is shutting down and the request's grace period is over: it was cut, not finished."""


class ReaderTooSlow(EngineFailure):
    """The request's consumer left more outputs unread than the bound: the request was aborted."""


class QueueFull(RuntimeError):
    """More requests are in flight than the server takes; the client should retry later."""


# Called once per request that ran to its end: prompt tokens, output tokens, and the engine's measures of the
# time to the first token and to the end.
FinishedObserver = Callable[[int, int, float | None, float], None]


# The engine thread runs Python between torch calls; with the default 5 ms GIL switch interval the event loop
# waits up to that long for every wake-up, which on a small model is as long as a whole decode step.
GIL_SWITCH_INTERVAL = 0.0005


@dataclass(slots=True, frozen=True)
class _Cut:
    """Put in a request's output queue to end it with `error` (its engine request is aborted), after the
    outputs already queued: by `cut_all` on shutdown, or when the consumer reads too slowly."""

    error: EngineFailure
    why: str  # for the log


class Admission:
    """Slots of the in-flight bound held by one HTTP response (one per choice) for one client, and the LoRA
    adapters its requests run with (by id, one hold per request); `release` is idempotent."""

    def __init__(self, engine: AsyncEngine, slots: int, client: str, loras: list[int]) -> None:
        self._engine = engine
        self._slots = slots
        self._client = client
        self._loras = loras

    def release(self) -> None:
        if self._slots:
            self._engine._give_back(self._client, self._slots, self._loras)
            self._slots = 0


class AsyncEngine:
    def __init__(
        self,
        engine: EngineCore,
        *,
        max_in_flight: int | None = None,
        max_in_flight_per_client: int | None = None,
        max_unread_outputs: int = 4096,
        on_finished: FinishedObserver | None = None,
    ) -> None:
        """`max_in_flight` bounds the requests running or waiting (beyond it `admit` raises `QueueFull`), and
        `max_in_flight_per_client` one client's share of them, so that one client's burst cannot take every
        slot and leave the others nothing but 429s; `max_unread_outputs` the outputs a request's consumer
        may leave unread (beyond it the request is aborted and ends with `ReaderTooSlow`)."""
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL))
        self.engine = engine
        self.max_in_flight = max_in_flight
        self.max_in_flight_per_client = max_in_flight_per_client
        self.max_unread_outputs = max_unread_outputs
        self.on_finished = on_finished
        self._thread = EngineThread(engine)
        self._ids = itertools.count()
        # Slots held by admissions, in all and per client; touched only on the event loop's thread.
        self.in_flight = 0
        self._held: dict[str, int] = {}
        # The output queue of every request being generated, by id: what `cut_all` reaches.
        self._queues: dict[str, asyncio.Queue[RequestOutput | _Cut]] = {}
        # The admitted requests of each LoRA adapter id. Read by the engine thread (`unload_lora`), so every
        # access, and the adapter check that goes with a hold, is under the lock.
        self._lora_holds: Counter[int] = Counter()
        self._lora_lock = threading.Lock()

    def admit(self, requests: list[tuple[list[int], SamplingParams]], client: str = "") -> Admission:
        """Before a response starts, for all of its engine requests: `RequestRejected` for one that can never
        run (`LoraNotFound` for an adapter unloaded since the request named it), `QueueFull` when they do not
        fit under the bound or `client`'s share of it; else their slots and adapters, taken now."""
        for prompt_token_ids, params in requests:
            self.engine.check(prompt_token_ids, params)
        count = len(requests)
        self._check_bound(count, client)
        loras = [p.lora_id for _, p in requests if p.lora_id is not None]
        with self._lora_lock:  # checked again where no unload can come between the check and the hold
            for lora_id in set(loras):
                self.engine.check_lora(lora_id)
            self._lora_holds.update(loras)
        self.in_flight += count
        self._held[client] = self._held.get(client, 0) + count
        return Admission(self, count, client, loras)

    def _check_bound(self, count: int, client: str) -> None:
        if self.max_in_flight is not None and self.in_flight + count > self.max_in_flight:
            raise QueueFull(f"{self.in_flight} requests are already in flight; retry shortly")
        held = self._held.get(client, 0)
        share = self.max_in_flight_per_client
        if share is not None and held + count > share:
            raise QueueFull(
                f"this client already has {held} requests in flight, and one client may have {share}; "
                "retry shortly"
            )

    def _give_back(self, client: str, slots: int, loras: list[int]) -> None:
        with self._lora_lock:
            self._lora_holds.subtract(loras)
            for lora_id in loras:
                if not self._lora_holds[lora_id]:
                    del self._lora_holds[lora_id]  # ids are never reused: no entry lingers
        self.in_flight -= slots
        left = self._held[client] - slots
        if left:
            self._held[client] = left
        else:
            del self._held[client]  # no entry lingers for a client that went away

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as the engine produces them; the last one has a finish reason.

        The caller holds the request's `Admission` (the engine alone, as benchmarks drive it, needs none)."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput | _Cut] = asyncio.Queue()
        rid = request_id or f"req-{next(self._ids)}"

        overflowed = False

        def put(output: RequestOutput) -> None:
            # A client that reads slower than the engine writes (or not at all while its connection stays
            # open) would have its outputs pile up for as long as the request runs; past the bound the request
            # is aborted instead, and the consumer, once it gets there, finds why after what was queued.
            nonlocal overflowed
            if overflowed:
                return
            outputs.put_nowait(output)
            if outputs.qsize() > self.max_unread_outputs and not output.finished:
                overflowed = True
                error = ReaderTooSlow(
                    f"the client left over {self.max_unread_outputs} outputs unread; the request was aborted"
                )
                outputs.put_nowait(_Cut(error, "its client read too slowly"))
                self._thread.abort(rid)  # now, not when the slow reader gets to the marker

        def deliver(output: RequestOutput) -> None:
            loop.call_soon_threadsafe(put, output)

        self._thread.add_request(rid, prompt_token_ids, params, deliver)
        self._queues[rid] = outputs
        produced = 0
        finished = False
        try:
            while True:
                output = await outputs.get()
                if isinstance(output, _Cut):
                    finished = True
                    logger.info("request %s cut: %s; aborting it", rid, output.why)
                    self._thread.abort(rid)
                    raise output.error
                if output.error is not None:
                    finished = True
                    raise EngineFailure(output.error)
                produced += len(output.new_token_ids)
                yield output
                if output.finished:
                    finished = True
                    if self.on_finished is not None and output.latency is not None:
                        self.on_finished(
                            len(prompt_token_ids), produced, output.time_to_first_token, output.latency
                        )
                    return
        finally:
            del self._queues[rid]
            if not finished:
                logger.info("request %s abandoned by its client; aborting it", rid)
                self._thread.abort(rid)

    @property
    def stopped_because(self) -> str | None:
        """Why the engine thread stopped for good (it serves nothing more), or None while it runs."""
        return self._thread.stopped_because

    def abort(self, request_id: str) -> None:
        """End a request being generated at the engine's next step: its consumer has all it wants (the answer
        reached a stop string). Its `generate` then yields a last output that says `abort`."""
        self._thread.abort(request_id)

    async def unload_lora(self, name: str) -> None:
        """Unload the adapter `name` on the engine thread: `LoraNotFound` if none is loaded, `LoraRefused`
        while admitted requests hold it (running, or not yet taken by the engine)."""

        def unload(engine: EngineCore) -> None:
            with self._lora_lock:
                adapter = engine.loras.get(name)
                held = 0 if adapter is None else self._lora_holds[adapter.lora_id]
                if held:
                    raise LoraRefused(
                        f"{held} requests are running with the LoRA adapter {name!r}; unload it once they "
                        "end",
                        "lora_name",
                    )
                engine.unload_lora(name)

        await self.call(unload)

    async def call(self, fn: Callable[[EngineCore], T]) -> T:
        """`fn(engine)` run on the engine thread between two steps (loading or unloading a LoRA adapter), its
        result or what it raised."""
        return await asyncio.wrap_future(self._thread.call(fn))

    def cut_all(self, reason: str) -> None:
        """End every request being generated with `ShuttingDown(reason)`, which its consumer turns into the
        API's terminal error event (its engine request is aborted). On the event loop's thread."""
        for outputs in self._queues.values():
            outputs.put_nowait(_Cut(ShuttingDown(reason), "the server is shutting down"))

    def shutdown(self) -> None:
        self._thread.stop()
