"""The SSRF guard and the fetch path: what may be fetched, what is refused before any connection, and the caps.

Traffic goes only to loopback servers these tests start; the guard refuses loopback by default, so the fetch
path is exercised through the deployment allowlist (`FetchPolicy.allowed_networks`), and every refusal is
checked to have reached nothing: no request at the HTTP layer, no hit on the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tools.browser.backends import BrowserError
from tools.browser.fetch import FetchPolicy, SafeFetcher, denial_reason, parse_ip_literal

Handler = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Loopback:
    host: str
    port: int
    hits: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (path, headers) per request

    def url(self, path: str = "/", scheme: str = "http") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{path}"


def reply(
    status: int = 200,
    body: bytes = b"",
    content_type: str | None = "text/html",
    headers: dict[str, str] | None = None,
) -> Handler:
    def handle(request: BaseHTTPRequestHandler) -> None:
        request.send_response(status)
        if content_type:
            request.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    return handle


@contextlib.contextmanager
def loopback_server(
    routes: dict[str, Handler], host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
) -> Iterator[Loopback]:
    """An HTTP server on a loopback address, answering `routes` by path (the query ignored), 404 otherwise;
    HTTPS when given a server-side `tls` context."""
    server_box: list[Loopback] = []

    class RequestHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server_box[0].hits.append((self.path, dict(self.headers)))
            path = self.path if self.path.startswith("http") else self.path.split("?", 1)[0]
            routes.get(path, reply(404, b"not here"))(self)

        def log_message(self, format: str, *args: object) -> None:  # quiet: pytest shows failures anyway
            pass

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

    server = Server((host, 0), RequestHandler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    server_box.append(Loopback(host, server.server_address[1]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_box[0]
    finally:
        server.shutdown()
        server.server_close()


def allowing(
    *servers: Loopback, networks: tuple[str, ...] = ("127.0.0.1/32",), **kwargs: object
) -> FetchPolicy:
    """A policy that lets these tests reach their own servers and nothing else on loopback."""
    return FetchPolicy(
        allowed_ports=frozenset({80, 443, *(s.port for s in servers)}),
        allowed_networks=tuple(ipaddress.ip_network(n) for n in networks),
        **kwargs,  # type: ignore[arg-type]
    )


class Recorder:
    """A resolver and a transport that record what reached them; the transport answers every request."""

    def __init__(self, answers: dict[str, list[str]] | None = None) -> None:
        self.answers = answers or {}
        self.resolved: list[str] = []
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self._answer)

    async def resolve(self, host: str, port: int) -> list[str]:
        self.resolved.append(host)
        if host not in self.answers:
            raise OSError("no such host")
        return self.answers[host]

    def _answer(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(200, headers={"Content-Type": "text/html"}, content=b"<p>hello</p>")

    def fetcher(self, policy: FetchPolicy | None = None) -> SafeFetcher:
        return SafeFetcher(policy, resolver=self.resolve, transport=self.transport)


def fetch(fetcher: SafeFetcher, url: str) -> str:
    return asyncio.run(fetcher.fetch(url)).text


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://127.0.0.1:80/",
        "http://[::1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://10.255.255.254/",
        "http://172.16.0.1/",
        "http://192.168.1.1/",
        "http://100.64.0.1/",  # CGNAT
        "http://198.18.0.1/",  # benchmarking
        "http://192.0.2.1/",  # TEST-NET-1
        "http://203.0.113.9/",  # TEST-NET-3
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://240.0.0.1/",
        "http://255.255.255.255/",
        "http://[::]/",
        "http://[::ffff:127.0.0.1]/",  # IPv4-mapped
        "http://[::ffff:8.8.8.8]/",  # mapped, even to a public address: the guard does not reason about tunnels
        "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
        "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",  # Teredo
        "http://[fe80::1]/",
        "http://[fc00::1]/",
        "http://[ff02::1]/",
        "http://[2001:db8::1]/",
        "http://2130706433/",  # 127.0.0.1 as one number
        "http://127.1/",
        "http://0x7f.1/",
        "http://0x7f000001/",
        "http://017700000001/",
        "http://1.1.1.1.2/",
        "ftp://example.com/",
        "file:///etc/passwd",
        "gopher://example.com/",
        "http://user:secret@example.com/",
        "http://example.com:8080/",
        "http://example.com:22/",
        "http:///nohost",
    ],
)
def test_refused_targets_reach_nothing(url: str) -> None:
    recorder = Recorder({"example.com": ["93.184.216.34"]})
    with pytest.raises(BrowserError, match="refused"):
        fetch(recorder.fetcher(), url)
    assert recorder.requests == []


def test_names_resolving_to_any_private_address_are_refused() -> None:
    recorder = Recorder(
        {
            "intranet.example": ["10.1.2.3"],
            "metadata.example": ["169.254.169.254"],
            "mixed.example": ["93.184.216.34", "127.0.0.1"],  # one bad address refuses the host
            "v6.example": ["2606:2800:220:1:248:1893:25c8:1946", "fd00::1"],
            "localhost": ["127.0.0.1", "::1"],
        }
    )
    fetcher = recorder.fetcher()
    for host in ("intranet.example", "metadata.example", "mixed.example", "v6.example", "localhost"):
        with pytest.raises(BrowserError, match="not a public address"):
            fetch(fetcher, f"https://{host}/")
    assert recorder.requests == []
    assert recorder.resolved == [
        "intranet.example",
        "metadata.example",
        "mixed.example",
        "v6.example",
        "localhost",
    ]


def test_the_connection_goes_to_the_vetted_address_and_tls_checks_the_name() -> None:
    recorder = Recorder({"www.example.com": ["93.184.216.34"], "v6.example.com": ["2606:2800:220:1::1"]})
    fetcher = recorder.fetcher()
    assert fetch(fetcher, "https://www.example.com/a?b=1#frag") == "<p>hello</p>"
    assert fetch(fetcher, "http://v6.example.com/") == "<p>hello</p>"
    tls, plain = recorder.requests
    # The URL carries the pinned address, so no second lookup can change where the connection goes...
    assert str(tls.url) == "https://93.184.216.34/a?b=1"
    assert str(plain.url) == "http://[2606:2800:220:1::1]/"
    # ...while the site's name is what the server and the certificate check see.
    assert tls.headers["host"] == "www.example.com"
    assert tls.extensions["sni_hostname"] == "www.example.com"
    assert plain.headers["host"] == "v6.example.com"
    assert "sni_hostname" not in plain.extensions
    assert tls.headers["accept-encoding"] == "identity"
    assert "cookie" not in tls.headers


def test_public_addresses_are_allowed_and_ip_literals_parsed_strictly() -> None:
    for public in ("93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "2a00:1450:4001:82a::200e"):
        assert denial_reason(ipaddress.ip_address(public)) is None
    assert parse_ip_literal("93.184.216.34") == ipaddress.ip_address("93.184.216.34")
    assert parse_ip_literal("example.com") is None
    assert parse_ip_literal("1x.example.com") is None  # a name whose last label is not a number
    recorder = Recorder()
    assert fetch(recorder.fetcher(), "http://93.184.216.34/") == "<p>hello</p>"
    assert recorder.resolved == []  # a literal is checked as it is, not looked up


def test_a_loopback_server_is_refused_by_default_and_fetched_when_allowlisted() -> None:
    with loopback_server(
        {"/page": reply(body=b"<title>T</title><p>served</p>", content_type="text/html; charset=utf-8")}
    ) as site:
        ports_only = FetchPolicy(allowed_ports=frozenset({site.port}))
        with pytest.raises(BrowserError, match="loopback"):
            fetch(SafeFetcher(ports_only), site.url("/page"))
        assert site.hits == []
        page = asyncio.run(SafeFetcher(allowing(site)).fetch(site.url("/page")))
    assert page.text == "<title>T</title><p>served</p>"
    assert page.content_type == "text/html"
    assert page.url == site.url("/page")
    assert [path for path, _ in site.hits] == ["/page"]


def test_a_redirect_to_a_denied_address_is_refused_before_it_is_reached() -> None:
    with loopback_server({}, host="127.0.0.2") as inner:
        inner_hits: list[object] = inner.hits
        with loopback_server(
            {
                "/to-inner": reply(302, headers={"Location": inner.url("/secret")}),
                "/to-metadata": reply(301, headers={"Location": "http://169.254.169.254/latest/meta-data/"}),
                "/to-v6": reply(307, headers={"Location": f"http://[::1]:{inner.port}/"}),
                "/to-number": reply(308, headers={"Location": f"http://2130706433:{inner.port}/"}),
                "/to-file": reply(302, headers={"Location": "file:///etc/passwd"}),
            }
        ) as site:
            # Both servers' ports are allowed; only the first server's address is.
            fetcher = SafeFetcher(allowing(site, inner))
            for path in ("/to-inner", "/to-metadata", "/to-v6", "/to-number", "/to-file"):
                with pytest.raises(BrowserError, match="refused"):
                    fetch(fetcher, site.url(path))
            assert len(site.hits) == 5
    assert inner_hits == []


def test_redirects_are_followed_by_hand_at_most_five_times() -> None:
    routes = {f"/hop{i}": reply(302, headers={"Location": f"/hop{i + 1}"}) for i in range(7)}
    routes["/hop5"] = reply(body=b"<p>arrived</p>")
    with loopback_server(routes) as site:
        fetcher = SafeFetcher(allowing(site))
        page = asyncio.run(fetcher.fetch(site.url("/hop0")))
        assert page.text == "<p>arrived</p>"
        assert page.url == site.url("/hop5")
        routes["/hop5"] = reply(302, headers={"Location": "/hop6"})
        with pytest.raises(BrowserError, match="more than 5 redirects"):
            fetch(fetcher, site.url("/hop0"))


def test_cookies_are_neither_kept_nor_sent() -> None:
    routes = {
        "/set": reply(302, headers={"Location": "/check", "Set-Cookie": "session=abc; Path=/"}),
        "/check": reply(body=b"<p>ok</p>"),
    }
    with loopback_server(routes) as site:
        assert fetch(SafeFetcher(allowing(site)), site.url("/set")) == "<p>ok</p>"
    (_, first), (_, second) = site.hits
    assert "Cookie" not in second
    assert first["Accept-Encoding"] == "identity"


def test_bodies_over_the_cap_are_refused_with_or_without_a_length() -> None:
    big = b"x" * 70_000

    def unframed(request: BaseHTTPRequestHandler) -> None:
        # No Content-Length: the body ends when the connection closes, so only the streamed count can stop it.
        request.send_response(200)
        request.send_header("Content-Type", "text/plain")
        request.send_header("Connection", "close")
        request.end_headers()
        request.wfile.write(big)

    routes = {"/framed": reply(body=big, content_type="text/plain"), "/unframed": unframed,
              "/small": reply(body=b"x" * 60_000, content_type="text/plain")}  # fmt: skip
    with loopback_server(routes) as site:
        fetcher = SafeFetcher(allowing(site, max_bytes=64 * 1024))
        for path in ("/framed", "/unframed"):
            with pytest.raises(BrowserError, match="larger than 65536 bytes"):
                fetch(fetcher, site.url(path))
        assert len(fetch(fetcher, site.url("/small"))) == 60_000
    assert FetchPolicy().max_bytes == 5 * 1024 * 1024


def test_a_slow_server_is_cut_off_at_the_total_time_limit() -> None:
    def drip(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Type", "text/plain")
        request.end_headers()
        with contextlib.suppress(OSError):  # the client hangs up, as it should
            for _ in range(30):
                request.wfile.write(b"x")
                request.wfile.flush()
                time.sleep(0.1)

    with loopback_server({"/slow": drip}) as site:
        fetcher = SafeFetcher(allowing(site, total_timeout_s=0.5))
        started = time.monotonic()
        with pytest.raises(BrowserError, match=re.escape("timed out after 0.5 s")):
            fetch(fetcher, site.url("/slow"))
        assert time.monotonic() - started < 2.0
    assert FetchPolicy().total_timeout_s == 15.0


def test_only_text_media_types_are_accepted() -> None:
    routes = {
        "/png": reply(body=b"\x89PNG", content_type="image/png"),
        "/none": reply(body=b"?", content_type=None),
        "/pdf": reply(body=b"%PDF", content_type="application/pdf"),
        "/json": reply(body=b'{"a": 1}', content_type="application/json"),
        "/missing": reply(404, b"gone"),
    }
    with loopback_server(routes) as site:
        fetcher = SafeFetcher(allowing(site))
        for path, media in (("/png", "image/png"), ("/none", "none")):
            with pytest.raises(BrowserError, match=f"unsupported content type `{media}`"):
                fetch(fetcher, site.url(path))
        # PDF is taken, read through its text (tests/tools/test_browser_pdf.py): this one is no PDF at all.
        with pytest.raises(BrowserError, match="the PDF could not be read"):
            fetch(fetcher, site.url("/pdf"))
        assert fetch(fetcher, site.url("/json")) == '{"a": 1}'
        with pytest.raises(BrowserError, match=re.escape("404 for http://127.0.0.1")):
            fetch(fetcher, site.url("/missing"))


def test_proxy_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    with loopback_server({}) as proxy, loopback_server({"/": reply(body=b"<p>direct</p>")}) as site:
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy.url())

        async def through_environment() -> None:
            # The control: a client that does read the environment goes to the proxy, so the variables bite.
            async with httpx.AsyncClient(trust_env=True) as client:
                await client.get(site.url())

        asyncio.run(through_environment())
        assert len(proxy.hits) == 1
        assert fetch(SafeFetcher(allowing(site)), site.url()) == "<p>direct</p>"
    assert len(proxy.hits) == 1
    assert len(site.hits) == 1


def test_a_server_that_breaks_off_mid_answer_is_a_plain_error() -> None:
    def truncated(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Type", "text/html")
        request.send_header("Content-Length", "1000")
        request.end_headers()
        request.wfile.write(b"<p>only part")
        request.close_connection = True

    with (
        loopback_server({"/cut": truncated}) as site,
        pytest.raises(BrowserError, match=re.escape("could not be read (RemoteProtocolError)")),
    ):
        fetch(SafeFetcher(allowing(site)), site.url("/cut"))


def test_tls_checks_the_hostname_while_the_connection_goes_to_the_pinned_address(tmp_path: Path) -> None:
    # A self-signed certificate for pinned.test only, made with the openssl command line (no Python crypto
    # library needed); the client trusts it as its CA.
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=pinned.test", "-addext", "subjectAltName=DNS:pinned.test",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))
    resolved: list[str] = []

    async def to_loopback(host: str, port: int) -> list[str]:
        resolved.append(host)
        return ["127.0.0.1"]

    with loopback_server({"/": reply(body=b"<p>over tls</p>")}, tls=server_tls) as site:
        fetcher = SafeFetcher(allowing(site), tls=client_tls, resolver=to_loopback)
        assert fetch(fetcher, f"https://pinned.test:{site.port}/") == "<p>over tls</p>"
        # The same address under a name the certificate does not carry: the handshake fails, nothing is read.
        with pytest.raises(BrowserError, match=re.escape("could not connect to `impostor.test`")):
            fetch(fetcher, f"https://impostor.test:{site.port}/")
    assert resolved == ["pinned.test", "impostor.test"]
    ((_, headers),) = site.hits
    assert headers["Host"] == f"pinned.test:{site.port}"
