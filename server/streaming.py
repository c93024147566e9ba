"""The one SSE response every streaming endpoint returns."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from sse_starlette import EventSourceResponse

from server.settings import ServerSettings


def sse(events: AsyncIterator[Mapping[str, str]], settings: ServerSettings) -> EventSourceResponse:
    """Stream `events` ({"data": ...}, or with an "event" name); keep-alive pings every 15 s.

    On shutdown a stream may run on for `settings.shutdown_grace` seconds to finish before it is cancelled
    (which aborts its request in the engine); without that, SIGTERM would cut every stream at once.
    """
    return EventSourceResponse(events, ping=15, shutdown_grace_period=settings.shutdown_grace)


async def data_events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, str]]:
    async for line in lines:
        yield {"data": line}
