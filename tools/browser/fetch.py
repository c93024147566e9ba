"""Direct HTTP fetching for the browser tool, guarded against server-side request forgery.

The model chooses the URLs (and any page it reads can suggest some), so every fetch is treated as hostile:

* only http and https, no credentials in the URL, ports 80 and 443 unless the deployment allows more;
* the host is resolved first and EVERY address it resolves to must be public, or nothing is fetched (loopback,
  private, link-local including the cloud metadata address 169.254.169.254, multicast, reserved, unspecified,
  CGNAT, benchmarking, the TEST-NETs, and IPv6 forms that embed IPv4: NAT64, 6to4, Teredo, IPv4-mapped);
* the connection goes to the vetted address itself (the URL's host is replaced by the IP, the Host header and
  TLS server name keep the hostname, so certificates are still checked against it): a second DNS answer
  cannot swap in another address between the check and the connection;
* IP-literal hosts are checked like resolved ones, and the non-canonical IPv4 spellings that C resolvers and
  browsers accept (``2130706433``, ``127.1``, ``0x7f.1``) are refused outright: what they mean depends on who
  parses them;
* redirects are followed here, at most five, and every hop goes through the same checks;
* proxy variables are ignored (``trust_env=False``: a proxy would connect on our behalf to unchecked
  addresses), cookies are never kept or sent;
* the body is streamed and capped (5 MiB), the whole fetch is bounded in time (15 s), and only text media
  types and PDF are accepted (a PDF's text is extracted on a worker thread, within the same time).

Networks a deployment trusts (an intranet wiki, say) can be allowed in `FetchPolicy.allowed_networks`; nothing
is allowed by default. The tests use that allowlist to reach their own loopback servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import ipaddress
import logging
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import httpx

from tools.browser.backends import BrowserError, FetchedPage
from tools.browser.pdf import PDF_TYPE, pdf_text

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# What the page pipeline can read: text, and PDF through its text (`tools.browser.pdf`). Images and
# archives are not for a text browser.
TEXT_TYPES = frozenset(
    {"text/html", "application/xhtml+xml", "text/plain", "text/markdown", "application/json", PDF_TYPE}
)

# Ranges `ipaddress`'s flags do not all name, or name differently across Python versions; each is refused
# whatever the flags say. The label is what the log and the error say.
_DENIED: tuple[tuple[str, IPNetwork], ...] = tuple(
    (label, ipaddress.ip_network(net))
    for label, net in (
        ("this network", "0.0.0.0/8"),
        ("carrier-grade NAT", "100.64.0.0/10"),
        ("link-local", "169.254.0.0/16"),
        ("IETF protocol assignments", "192.0.0.0/24"),
        ("TEST-NET-1", "192.0.2.0/24"),
        ("6to4 relay anycast", "192.88.99.0/24"),
        ("benchmarking", "198.18.0.0/15"),
        ("TEST-NET-2", "198.51.100.0/24"),
        ("TEST-NET-3", "203.0.113.0/24"),
        ("multicast", "224.0.0.0/4"),
        ("reserved", "240.0.0.0/4"),
        ("IPv4-compatible IPv6", "::/96"),
        ("IPv4-mapped IPv6", "::ffff:0:0/96"),
        ("NAT64", "64:ff9b::/96"),
        ("local-use NAT64", "64:ff9b:1::/48"),
        ("discard-only", "100::/64"),
        ("Teredo", "2001::/32"),
        ("benchmarking", "2001:2::/48"),
        ("ORCHID", "2001:10::/28"),
        ("documentation", "2001:db8::/32"),
        ("6to4", "2002::/16"),
        ("unique local", "fc00::/7"),
        ("link-local", "fe80::/10"),
        ("site-local", "fec0::/10"),
        ("multicast", "ff00::/8"),
    )
)

# The WHATWG URL rule: a host whose last label is a number (decimal, or hex with 0x) is an IPv4 address.
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    allowed_ports: frozenset[int] = frozenset({80, 443})
    # Networks exempt from the public-address rule: none by default.
    allowed_networks: tuple[IPNetwork, ...] = ()
    max_bytes: int = 5 << 20
    total_timeout_s: float = 15.0
    connect_timeout_s: float = 5.0
    max_redirects: int = 5
    content_types: frozenset[str] = field(default=TEXT_TYPES)
    user_agent: str = "gpt-oss-server-browser/0.1"


class Unresolvable(BrowserError):
    """The host has no address."""


class Refused(BrowserError):
    """The host resolves to an address the guard refuses."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"refused: `{host}` is not a public address ({reason})")
        self.reason = reason


async def vetted_addresses(
    host: str, port: int, resolve: Resolver, allowed: Iterable[IPNetwork], who: str
) -> list[IPAddress]:
    """The addresses `host` may be reached at: every one it resolves to must be public or in `allowed`.
    Fail closed: one bad address among good ones refuses the whole host (`Refused`, logged as `who`'s),
    since which one a client would use is not ours to predict. Scope ids (fe80::1%eth0) are dropped: the
    address alone decides."""
    literal = parse_ip_literal(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            answers = await resolve(host, port)
        except OSError as exc:
            raise Unresolvable(f"could not resolve `{host}`") from exc
        addresses = [ipaddress.ip_address(answer.split("%", 1)[0]) for answer in answers]
    if not addresses:
        raise Unresolvable(f"could not resolve `{host}`")
    networks = list(allowed)
    for address in addresses:
        if any(address in network for network in networks):
            continue
        reason = denial_reason(address)
        if reason is not None:
            logger.warning("%s refused: %s resolves to %s (%s)", who, host, address, reason)
            raise Refused(host, reason)
    return addresses


def denial_reason(ip: IPAddress) -> str | None:
    """Why `ip` is not a public address, or None when it is."""
    for label, network in _DENIED:
        if ip.version == network.version and ip in network:
            return label
    for label, flag in (
        ("loopback", ip.is_loopback),
        ("unspecified", ip.is_unspecified),
        ("private", ip.is_private),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
    ):
        if flag:
            return label
    # Anything else IANA does not list as globally reachable.
    return None if ip.is_global else "not globally reachable"


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address an IP-literal host names, None for a hostname; BrowserError for non-canonical IPv4."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        # Canonical dotted quads were taken above; this is 127.1, 2130706433, 0x7f.1, 0177.0.0.1 and the like.
        raise BrowserError(f"refused: `{host}` is a non-canonical IP address")
    return None


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _no_cookies() -> http.cookiejar.CookieJar:
    # A policy that accepts no domain: Set-Cookie is dropped, so nothing is sent on the next hop. The jar is
    # handed to httpx as it is: wrapped in httpx.Cookies it would be copied into a jar that keeps everything.
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


class SafeFetcher:
    """A PageFetcher for the open web. `tls` replaces the system's CA trust (a private CA, for an intranet or
    the tests); `resolver` and `transport` are seams for tests."""

    def __init__(
        self,
        policy: FetchPolicy | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        resolver: Resolver = system_resolve,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.policy = policy or FetchPolicy()
        self._resolve = resolver
        self._transport = transport
        # One verifying TLS context for every fetch: building one loads the CA bundle, tens of milliseconds.
        self._tls = tls or httpx.create_ssl_context()

    async def fetch(self, url: str) -> FetchedPage:
        try:
            async with asyncio.timeout(self.policy.total_timeout_s):
                return await self._fetch(url)
        except TimeoutError:
            raise BrowserError(f"timed out after {self.policy.total_timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            # A server that breaks the protocol or the connection mid-answer: the model only needs to know
            # the page could not be read.
            logger.info("browser fetch %s failed: %r", url, exc)
            raise BrowserError(f"the server's answer could not be read ({type(exc).__name__})") from exc

    async def _fetch(self, url: str) -> FetchedPage:
        policy = self.policy
        timeout = httpx.Timeout(policy.total_timeout_s, connect=policy.connect_timeout_s)
        async with httpx.AsyncClient(
            trust_env=False,
            follow_redirects=False,
            timeout=timeout,
            cookies=_no_cookies(),
            headers={
                "User-Agent": policy.user_agent,
                "Accept": ", ".join(sorted(policy.content_types)),
                # Uncompressed bodies only: the size cap then bounds memory, where one small gzip chunk can
                # inflate to many megabytes before the cap is looked at.
                "Accept-Encoding": "identity",
            },
            transport=self._transport,
            verify=self._tls,
        ) as client:
            current = self._parse(url)
            for _hop in range(policy.max_redirects + 1):
                response = await self._send(client, current)
                async with contextlib.aclosing(response):
                    location = response.headers.get("location")
                    if response.status_code in _REDIRECTS and location:
                        try:
                            current = self._parse(str(current.join(location)))
                        except httpx.InvalidURL as exc:
                            raise BrowserError(f"bad redirect from {current}") from exc
                        continue
                    return await self._read(response, current)
            raise BrowserError(f"more than {policy.max_redirects} redirects")

    def _parse(self, url: str) -> httpx.URL:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise BrowserError(f"refused: invalid URL `{url}`") from exc
        if parsed.scheme not in ("http", "https"):
            raise BrowserError(f"refused: only http and https URLs can be opened, not `{parsed.scheme}:`")
        if parsed.userinfo:
            raise BrowserError("refused: URLs with credentials are not opened")
        if not parsed.raw_host:
            raise BrowserError(f"refused: `{url}` has no host")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        if port not in self.policy.allowed_ports:
            raise BrowserError(f"refused: port {port} is not allowed")
        return parsed.copy_with(fragment=None)

    async def _vetted_addresses(self, host: str, port: int) -> list[IPAddress]:
        return await vetted_addresses(
            host, port, self._resolve, self.policy.allowed_networks, "browser fetch"
        )

    async def _send(self, client: httpx.AsyncClient, url: httpx.URL) -> httpx.Response:
        host = url.raw_host.decode("ascii")
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = await self._vetted_addresses(host, port)
        # TLS checks the certificate against the hostname although the connection goes to the address.
        tls_name = url.scheme == "https" and parse_ip_literal(host) is None
        extensions = {"sni_hostname": host} if tls_name else {}
        last_error: httpx.HTTPError | None = None
        for address in addresses:
            request = client.build_request(
                "GET",
                url.copy_with(host=str(address)),
                # The Host header names the site, not the address we pinned.
                headers={"Host": url.netloc.decode("ascii")},
                extensions=extensions,
            )
            try:
                logger.info("browser fetch %s via %s", url, address)
                return await client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last_error = exc
        raise BrowserError(f"could not connect to `{host}`") from last_error

    async def _read(self, response: httpx.Response, url: httpx.URL) -> FetchedPage:
        policy = self.policy
        if not 200 <= response.status_code < 300:
            raise BrowserError(f"{response.status_code} for {url}")
        media_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type not in policy.content_types:
            raise BrowserError(f"unsupported content type `{media_type or 'none'}` for {url}")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > policy.max_bytes:
            raise BrowserError(f"page larger than {policy.max_bytes} bytes: {url}")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > policy.max_bytes:
                raise BrowserError(f"page larger than {policy.max_bytes} bytes: {url}")
        if media_type == PDF_TYPE:
            # On a thread, which stops by itself at the fetch's time limit (the await is cut then too).
            deadline = time.monotonic() + policy.total_timeout_s
            title, text = await asyncio.to_thread(pdf_text, bytes(body), deadline)
            return FetchedPage(url=str(url), content_type=media_type, text=text, title=title)
        return FetchedPage(url=str(url), content_type=media_type, text=_decode(bytes(body), response))


def _decode(body: bytes, response: httpx.Response) -> str:
    try:
        return body.decode(response.charset_encoding or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return body.decode("utf-8", errors="replace")
