"""Streaming: merging a response's choices as they come, and the one SSE response every stream returns."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

import anyio
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from server.async_engine import AsyncEngine, EngineFailure
from server.errors import engine_failure
from server.settings import ServerSettings

T = TypeVar("T")

# Characters that JSON may carry raw but that some line splitters take for line ends (Python's
# str.splitlines(), JavaScript before ES2019): escaped, an event's data is one line for every reader.
_LINE_BREAKERS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_json(value: Any) -> str:
    """`value` as the JSON of one SSE data line: non-ASCII text kept as it is, except line separators."""
    return json.dumps(value, ensure_ascii=False).translate(_LINE_BREAKERS)


async def fan_in(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """The items of `streams` as each arrives, with the index of its stream.

    One task per stream feeds a shared queue, so a slow choice never holds back the others. An exception in
    one stream is raised here; leaving early (an error, or the consumer going away) cancels every stream's
    task, which aborts its request in the engine.
    """
    done = object()
    # Bounded, so a consumer that stops reading stops the pumps too, and the outputs wait in each request's
    # own queue, where `AsyncEngine`'s bound on unread outputs sees them.
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(maxsize=len(streams))

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        except Exception as error:  # handed to the consumer, which raises it
            await queue.put((index, error))
        else:
            await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def data_events(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, str]]:
    """The chat and completions stream: each chunk as a data event, then `[DONE]`. An engine failure after the
    stream started ends it with the error object (the envelope's body) before `[DONE]`."""
    try:
        async for chunk in chunks:
            yield {"data": sse_json(chunk)}
    except EngineFailure as error:
        yield {"data": sse_json(engine_failure(error).body())}
    yield {"data": "[DONE]"}


async def _cut_on_shutdown(
    events: AsyncIterator[Mapping[str, str]], shutdown: anyio.Event, grace: float, cut: Callable[[], None]
) -> AsyncIterator[Mapping[str, str]]:
    """`events`; once `shutdown` is set and `grace` seconds have passed, `cut` ends the requests in flight,
    and the stream goes on to carry the API's terminal error event before it ends."""

    async def watch() -> None:
        await shutdown.wait()
        await asyncio.sleep(grace)
        cut()

    watcher = asyncio.create_task(watch())
    try:
        async for event in events:
            yield event
    finally:
        watcher.cancel()


# How long after its grace period a cut stream may take to send its terminal event before sse_starlette
# cancels it (which would close it without one).
_FAREWELL_S = 2.0


class _EventStream(EventSourceResponse):
    def __init__(
        self,
        events: AsyncIterator[Mapping[str, str]],
        settings: ServerSettings,
        on_close: Callable[[], None],
        cut: Callable[[], None],
    ) -> None:
        shutdown = anyio.Event()
        super().__init__(
            _cut_on_shutdown(events, shutdown, settings.shutdown_grace, cut),
            ping=15,
            shutdown_event=shutdown,
            shutdown_grace_period=settings.shutdown_grace + _FAREWELL_S,
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def sse(
    events: AsyncIterator[Mapping[str, str]],
    settings: ServerSettings,
    on_close: Callable[[], None],
    engine: AsyncEngine,
) -> EventSourceResponse:
    """Stream `events` ({"data": ...}, or with an "event" name); keep-alive pings every 15 s. `on_close` runs
    when the response ends, however it ends (even if its events were never asked for).

    On shutdown a stream may run on for `settings.shutdown_grace` seconds to finish; then the engine's
    requests in flight are cut (`AsyncEngine.cut_all`), each of which its stream ends with the API's terminal
    error event (chat and completions: an error object, then [DONE]; Responses: response.failed). Without the
    grace SIGTERM would cut every stream at once, and without the cut they would close with no terminal event.
    """
    return _EventStream(events, settings, on_close, lambda: engine.cut_all("the server is shutting down"))
