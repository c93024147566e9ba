"""What uvicorn does not bound on its own: how long a client may take to send a request's headers.

uvicorn offers `timeout_keep_alive` (an idle keep-alive connection is closed after it; 5 s by default), a
limit on header size (`h11_max_incomplete_event_size`, 16 KiB) and `limit_concurrency`; its timer starts only
once a response is complete and stops at the first byte of the next request, and nothing times the first
request of a connection. So a client that sends half a request line, or headers a byte at a time, holds its
connection open for ever, and enough of them exhaust the server's sockets. `request_read_timeout` closes a
connection whose request headers have not all arrived within the deadline; the body's deadline is kept by
`server.app.BodyLimit`.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose next request's headers take over `seconds`."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                logger.info("closing a connection whose request headers took over %.1f s", seconds)
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # h11 leaves IDLE once a request's headers are complete.
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection gets the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
