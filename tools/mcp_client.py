"""A remote MCP server (streamable HTTP) for the model: list its tools, call one, behind the SSRF guard.

A request names the server (`tools: [{"type": "mcp", "server_url": ...}]`), so its URL is as untrusted as a
page the browser opens. Every connection the client makes, the first and any redirect the `mcp` library
follows, goes through `GuardedNetwork`: the host is resolved there, every address must be public
(`tools.browser.fetch.denial_reason`, the browser's own rule) or inside a network the deployment allowed
(`--mcp-allow`), and the socket is opened to that vetted address, so a second DNS answer cannot swap in
another one; TLS still checks the certificate against the hostname. Proxy variables are ignored. Public
addresses are reached on ports 80 and 443 only, as the browser's are; an allowed network on any port.

Each list or call is one short session (connect, act, close) bounded in time: nothing is kept between
requests, so no connection or server session is shared between users.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpcore2
import httpx2
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tools.browser.backends import BrowserError
from tools.browser.fetch import (
    IPAddress,
    IPNetwork,
    Refused,
    Unresolvable,
    parse_ip_literal,
    vetted_addresses,
)

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
T = TypeVar("T")

# What a tool's answer may put in front of the model, in characters; the rest is cut and the cut is said.
MAX_OUTPUT_CHARS = 20_000


class McpFailure(Exception):
    """A list or call that did not happen, as the API shows it: `kind` is "refused" (the guard said no),
    "http_error" (the server answered with an HTTP error, or could not be reached: `code` 502, or in time:
    504) or "mcp_protocol_error" (a JSON-RPC error, `code` its code)."""

    def __init__(self, kind: str, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.code = code

    def as_item_error(self) -> dict[str, Any]:
        """The `error` of an `mcp_call` item (`McpToolCallError` in the openai SDK)."""
        kind = "http_error" if self.kind == "refused" else self.kind
        return {"type": kind, "code": self.code, "message": self.message}


@dataclass(frozen=True, slots=True)
class McpTool:
    name: str
    description: str
    input_schema: dict[str, Any]
    annotations: dict[str, Any] | None = None

    @property
    def read_only(self) -> bool:
        return bool((self.annotations or {}).get("readOnlyHint"))


@dataclass(frozen=True, slots=True)
class McpOutcome:
    """A call's result: the text the model reads, and whether the tool said it failed (`content`: its
    content blocks, for the item's `mcp_tool_execution_error`)."""

    text: str
    is_error: bool
    content: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class McpPolicy:
    # Networks exempt from the public-address rule, at any port (`--mcp-allow`): none by default.
    allowed_networks: tuple[IPNetwork, ...] = ()
    allowed_ports: frozenset[int] = frozenset({80, 443})
    # Seconds one list or call may take, connection and handshake included.
    timeout_s: float = 30.0
    # Bytes one HTTP answer of the server may have (the library bounds SSE events, not JSON answers).
    max_response_bytes: int = 8 << 20
    connect_timeout_s: float = 5.0


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def check_url(url: str) -> httpx2.URL:
    """`url` as a server URL this client may try (http or https, a host, no credentials), else
    McpFailure("refused"). Where it points is checked at connection time (`GuardedNetwork`)."""
    try:
        parsed = httpx2.URL(url)
    except (httpx2.InvalidURL, TypeError) as exc:
        raise McpFailure("refused", f"invalid server_url {url!r}") from exc
    if parsed.scheme not in ("http", "https"):
        raise McpFailure("refused", "server_url must be an http or https URL")
    if parsed.userinfo:
        raise McpFailure("refused", "server_url must not carry credentials; send them in headers")
    if not parsed.host:
        raise McpFailure("refused", "server_url has no host")
    try:
        parse_ip_literal(parsed.host)
    except BrowserError as exc:
        raise McpFailure("refused", str(exc)) from exc
    return parsed


class GuardedNetwork(httpcore2.AsyncNetworkBackend):
    """A network backend that connects only to vetted addresses (see the module's docstring)."""

    def __init__(self, policy: McpPolicy, resolver: Resolver = system_resolve) -> None:
        self.policy = policy
        self._resolve = resolver
        self._inner = httpcore2.AnyIOBackend()

    async def vetted(self, host: str, port: int) -> list[IPAddress]:
        """The addresses `host` may be reached at on `port`; McpFailure("refused") if any is not allowed."""
        try:
            addresses = await vetted_addresses(
                host, port, self._resolve, self.policy.allowed_networks, "mcp connection"
            )
        except Unresolvable as exc:
            raise McpFailure("http_error", f"could not resolve {host!r}", 502) from exc
        except Refused as exc:
            raise McpFailure(
                "refused",
                f"refused: {host!r} is not a public address ({exc.reason}); a deployment can allow its "
                "network with --mcp-allow",
            ) from exc
        except BrowserError as exc:  # not an address the guard can read
            raise McpFailure("refused", str(exc)) from exc
        if port not in self.policy.allowed_ports and not all(
            any(address in network for network in self.policy.allowed_networks) for address in addresses
        ):
            raise McpFailure("refused", f"refused: port {port} of a public address is not allowed")
        return addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        last: Exception | None = None
        for address in await self.vetted(host, port):
            try:
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore2.AsyncNetworkStream:
        raise McpFailure("refused", "unix sockets are not reached")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _Capped(httpx2.AsyncByteStream):
    """A response body that fails once it has given more than `limit` bytes."""

    def __init__(self, stream: httpx2.AsyncByteStream, limit: int) -> None:
        self._stream = stream
        self._limit = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0
        async for chunk in self._stream:
            size += len(chunk)
            if size > self._limit:
                raise McpFailure(
                    "http_error", f"the MCP server's answer is larger than {self._limit} bytes", 502
                )
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


class GuardedTransport(httpx2.AsyncHTTPTransport):
    """httpx2's own transport, its connection pool on `GuardedNetwork` (httpx2 takes no network backend as
    an argument, so the pool it builds is replaced by one that does), each answer's body capped."""

    def __init__(self, network: GuardedNetwork) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=httpx2.create_ssl_context(trust_env=False), network_backend=network
        )
        self._limit = network.policy.max_response_bytes

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle_async_request(request)
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=_Capped(response.stream, self._limit),
            extensions=response.extensions,
        )


class McpConnector:
    """Lists and calls the tools of MCP servers over streamable HTTP, each action one guarded session."""

    def __init__(self, policy: McpPolicy | None = None, *, resolver: Resolver = system_resolve) -> None:
        self.policy = policy or McpPolicy()
        self.network = GuardedNetwork(self.policy, resolver)

    async def list_tools(self, url: str, headers: dict[str, str]) -> list[McpTool]:
        """Every tool the server lists (all pages)."""

        async def act(client: Client) -> list[McpTool]:
            tools: list[McpTool] = []
            cursor: str | None = None
            for _ in range(100):  # a server whose pages never end cannot hold the request
                page = await client.list_tools(cursor=cursor)
                for tool in page.tools:
                    hints = tool.annotations
                    annotations = hints.model_dump(by_alias=True, exclude_none=True) if hints else None
                    tools.append(McpTool(tool.name, tool.description or "", tool.input_schema, annotations))
                cursor = page.next_cursor
                if cursor is None:
                    break
            return tools

        return await self._session(url, headers, act)

    async def call_tool(
        self, url: str, headers: dict[str, str], name: str, arguments: dict[str, Any]
    ) -> McpOutcome:
        async def act(client: Client) -> McpOutcome:
            result = await client.call_tool(name, arguments)
            blocks = [b.model_dump(mode="json", by_alias=True, exclude_none=True) for b in result.content]
            parts = [block["text"] if block.get("type") == "text" else json.dumps(block) for block in blocks]
            if not parts and result.structured_content is not None:
                parts = [json.dumps(result.structured_content)]
            text = "\n".join(parts)
            if len(text) > MAX_OUTPUT_CHARS:
                text = text[:MAX_OUTPUT_CHARS] + f"\n[output cut at {MAX_OUTPUT_CHARS} characters]"
            return McpOutcome(text, bool(result.is_error), blocks)

        return await self._session(url, headers, act)

    async def _session(self, url: str, headers: dict[str, str], act: Callable[[Client], Awaitable[T]]) -> T:
        check_url(url)
        http = httpx2.AsyncClient(
            transport=GuardedTransport(self.network),
            headers=headers,
            timeout=httpx2.Timeout(self.policy.timeout_s, connect=self.policy.connect_timeout_s),
            trust_env=False,
        )
        try:
            async with asyncio.timeout(self.policy.timeout_s):
                async with (
                    http,
                    Client(
                        streamable_http_client(url, http_client=http),
                        read_timeout_seconds=self.policy.timeout_s,
                        cache=None,
                    ) as client,
                ):
                    return await act(client)
        except TimeoutError:
            raise McpFailure(
                "http_error", f"the MCP server did not answer within {self.policy.timeout_s:g} s", 504
            ) from None
        except Exception as exc:  # the library's errors arrive as they are or inside exception groups
            raise _failure(exc, url) from exc


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _failure(exc: Exception, url: str) -> McpFailure:
    """What went wrong, for the API: the guard's refusal, the server's HTTP or JSON-RPC error, no answer."""
    leaves = _leaves(exc)
    for leaf in leaves:
        if isinstance(leaf, McpFailure):
            return leaf
    for leaf in leaves:
        if isinstance(leaf, MCPError):
            return McpFailure("mcp_protocol_error", leaf.error.message, leaf.code)
        if isinstance(leaf, httpx2.HTTPStatusError):
            status = leaf.response.status_code
            return McpFailure("http_error", f"the MCP server answered HTTP {status}", status)
    # The host only: a URL's query may carry a token.
    logger.warning("mcp server at %s failed: %r", httpx2.URL(url).host, exc)
    first = leaves[0]
    if isinstance(first, httpx2.TransportError | OSError):
        return McpFailure("http_error", f"could not connect to the MCP server ({type(first).__name__})", 502)
    return McpFailure(
        "http_error", f"the MCP server's answer could not be used ({type(first).__name__})", 502
    )
