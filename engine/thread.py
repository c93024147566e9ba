"""The engine on a thread of its own, for the server: any thread adds or aborts requests through a queue, and
each request's outputs go to that request's callback."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from engine.core import EngineCore
from engine.request import FinishReason, RequestError, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

OutputCallback = Callable[[RequestOutput], None]

# Whole-step failures in a row, with no step succeeding between them, after which each one is logged as
# critical: one failure may be a bad batch, three in a row with fresh requests each time point at the device.
FAILED_STEPS_ALARM = 3


class EngineThread:
    """Runs an `EngineCore` on its own thread. Thread-safe: any thread may add or abort requests.

    Each request's outputs are handed to its callback on the engine thread (the callback must be quick and
    must not block: an asyncio server passes `loop.call_soon_threadsafe`-based callbacks). What fails for one
    request alone (its processors, its parameters, its stop strings) ends that request only, and a callback
    that raises is logged. If a step raises as a whole (the forward), every request in flight ends with
    `abort` and the error text, and the engine goes on serving.

    If the engine cannot even do that (ending the requests raises too: its own books are broken), the thread
    stops for good rather than serve from broken books: every request it holds or is later given ends at
    once with the reason, and `stopped_because` says it, for /health to report and the orchestrator to
    restart the server. Nothing waits forever on a thread that is gone.
    """

    def __init__(self, engine: EngineCore) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[str, tuple]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._callbacks: dict[str, OutputCallback] = {}
        self._stopping = False
        # Set once, by the engine thread, when it stops for good (see the class docstring).
        self.stopped_because: str | None = None
        # Orders a request's registration against the thread's stop, so none is registered after the last
        # callbacks were ended.
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, callback: OutputCallback
    ) -> None:
        """Queue a request; raises `RequestError` at once for one that can never run. On a thread that has
        stopped for good the request ends at once, through its callback, with the reason."""
        self.engine.check(prompt_token_ids, params)
        with self._lock:
            if self.stopped_because is None:
                self._commands.put(("add", (request_id, prompt_token_ids, params, callback)))
                self._wake.set()
                return
        self._deliver(callback, _ended(request_id, self.stopped_because))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", (request_id,)))
        self._wake.set()

    def call(self, fn: Callable[[EngineCore], Any]) -> Future[Any]:
        """Run `fn(engine)` on the engine thread between two steps, where it may change what a step reads (the
        model's LoRA adapters); the future holds its result or what it raised."""
        future: Future[Any] = Future()
        with self._lock:
            if self.stopped_because is None:
                self._commands.put(("call", (fn, future)))
                self._wake.set()
                return future
        future.set_exception(RuntimeError(self.stopped_because))
        return future

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as error:
            self._stop_for_good(error)
            if not isinstance(error, Exception):
                raise

    def _stop_for_good(self, error: BaseException) -> None:
        reason = f"the engine stopped: {type(error).__name__}: {error}"
        logger.critical(
            "%s; every request ends with this error until the server is restarted", reason, exc_info=error
        )
        with self._lock:
            self.stopped_because = reason
        callbacks = dict(self._callbacks)
        self._callbacks.clear()
        while True:  # requests queued but never admitted
            try:
                kind, args = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                callbacks[args[0]] = args[3]
            elif kind == "call":
                args[1].set_exception(RuntimeError(reason))
        for request_id, callback in callbacks.items():
            self._deliver(callback, _ended(request_id, reason))

    def _serve(self) -> None:
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
                logger.exception("engine step failed; aborting %d requests", len(engine.scheduler.requests))
                outputs = engine.fail_all(f"engine error: {error}")
                in_a_row = engine.stats().num_failed_steps_in_a_row
                if in_a_row >= FAILED_STEPS_ALARM:
                    # Not stopping: each failed step's requests are ended (so nothing waits or spins), while a
                    # stopped engine would leave new requests hanging instead of failing with the reason.
                    logger.critical(
                        "the engine step has failed %d times in a row with no step succeeding (last: %s); "
                        "the device or the model is likely broken: requests will fail until it recovers",
                        in_a_row,
                        error,
                    )
            for output in outputs:
                callback = self._callbacks.get(output.request_id)
                if output.finished:
                    self._callbacks.pop(output.request_id, None)
                if callback is not None:
                    self._deliver(callback, output)

    @staticmethod
    def _deliver(callback: OutputCallback, output: RequestOutput) -> None:
        """A callback belongs to one request's consumer: if it raises, that is logged and the engine thread,
        which every other request needs, goes on."""
        try:
            callback(output)
        except Exception:
            logger.exception("the output callback of request %s raised", output.request_id)

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
                except RequestError as error:  # checked on the caller's thread, but params are mutable
                    self._deliver(callback, _ended(request_id, str(error)))
                    continue
                except Exception as error:  # a bug this request met: it alone fails
                    logger.exception("request %s could not be added", request_id)
                    self._deliver(callback, _ended(request_id, f"engine error: {error}"))
                    continue
                self._callbacks[request_id] = callback
            elif kind == "call":
                fn, future = args
                try:
                    future.set_result(fn(self.engine))
                except Exception as error:  # the caller's to handle; the engine goes on
                    future.set_exception(error)
            else:
                self.engine.abort(args[0])


def _ended(request_id: str, error: str) -> RequestOutput:
    """The last output of a request that ends, unrun or unfinished, with `error`."""
    return RequestOutput(request_id, [], finish_reason=FinishReason.ABORT, error=error)
