"""Request bodies: a large JSON body is parsed on a worker thread, not on the event loop.

`json.loads` holds the GIL for the whole of one parse (tens of milliseconds for a body of several MB), and
FastAPI parses each body on the event loop, after which it validates the parsed body and the route checks
its text: in one stretch with no await, so /health and every stream waited for all of it together. Parsed
on a worker thread, the loop waits at most for the parse itself, and the rest interleaves with other work.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import anyio.to_thread
from fastapi import Request, Response
from fastapi.routing import APIRoute

# Smaller bodies parse in well under a millisecond: a thread hop would cost more than it saves.
OFF_LOOP_BYTES = 1 << 20


class _Request(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) < OFF_LOOP_BYTES:
                self._json = json.loads(body)
            else:
                self._json = await anyio.to_thread.run_sync(json.loads, body)
        return self._json


class OffLoopJsonRoute(APIRoute):
    """A route whose JSON body, when large, is parsed on a worker thread (FastAPI's `route_class`)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(_Request(request.scope, request.receive))

        return handle
