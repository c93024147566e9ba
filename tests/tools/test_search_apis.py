"""The hosted search backends (Exa, Brave, You.com) against a fake provider on loopback that answers in each
API's documented shape: what each sends (method, path, key header, query), how its results become hits,
and how failures read (never with the key)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from server.builtin_tools import make_builtin_tools, settings_problem
from server.settings import ServerSettings
from tools.browser.backends import BrowserError
from tools.browser.search_apis import BraveBackend, ExaBackend, YouBackend

KEY = "sk-test-secret-key"


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class Provider:
    url: str
    seen: list[Seen] = field(default_factory=list)


@contextlib.contextmanager
def provider(status: int, answer: bytes) -> Iterator[Provider]:
    """A fake search API on loopback answering every GET and POST with `status` and `answer` (JSON)."""
    box: list[Provider] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            box[0].seen.append(
                Seen(
                    self.command,
                    parts.path,
                    parse_qs(parts.query),
                    dict(self.headers),
                    json.loads(raw) if raw else None,
                )
            )
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    box.append(Provider(f"http://127.0.0.1:{server.server_address[1]}"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield box[0]
    finally:
        server.shutdown()
        server.server_close()


EXA = {
    "requestId": "b5947044c4b78efa9552a7c89b306d95",
    "resolvedSearchType": "neural",
    "results": [
        {
            "title": "Ownership in Rust",
            "url": "https://doc.example.org/ownership",
            "id": "https://doc.example.org/ownership",
            "publishedDate": "2024-05-01T00:00:00.000Z",
            "author": None,
            "highlights": ["Each value has an owner.", "Values are dropped at scope end."],
            "highlightScores": [0.9, 0.8],
        },
        {
            "title": "No highlights",
            "url": "https://blog.example.com/rust",
            "id": "x",
            "text": "Borrowing " * 100,
        },
        {"title": "Not a web page", "url": "ftp://files.example.com/x", "id": "y"},
    ],
}

BRAVE = {
    "type": "search",
    "query": {"original": "rust ownership"},
    "web": {
        "type": "search",
        "results": [
            {
                "type": "search_result",
                "title": "Understanding <strong>Ownership</strong>",
                "url": "https://doc.example.org/ownership",
                "description": "Each value in Rust has an <strong>owner</strong>.",
                "page_age": "2024-05-01T00:00:00",
                "age": "May 1, 2024",
            },
            {
                "type": "search_result",
                "title": "Again",
                "url": "https://doc.example.org/ownership",
                "description": "",
            },
            {
                "type": "search_result",
                "title": "Blog",
                "url": "https://blog.example.com/rust",
                "description": "A post.",
            },
        ],
    },
}

YOU = {
    "results": {
        "web": [
            {
                "url": "https://doc.example.org/ownership",
                "title": "Ownership",
                "description": "The book's chapter.",
                "snippets": ["Each value has an owner.", "There can only be one owner at a time."],
                "page_age": "2024-05-01T00:00:00",
                "authors": [],
                "favicon_url": "https://ydc-index.io/favicon?domain=doc.example.org&size=128",
            }
        ],
        "news": [
            {
                "url": "https://news.example.net/rust-2024",
                "title": "Rust 2024 ships",
                "description": "The edition is out.",
                "page_age": "2025-02-20T00:00:00",
            }
        ],
    },
    "metadata": {"query": "rust ownership", "search_uuid": "a1b2c3d4", "latency": 0.3},
}


def test_exa_posts_the_query_with_its_key_and_maps_highlights() -> None:
    with provider(200, json.dumps(EXA).encode()) as fake:
        hits = asyncio.run(ExaBackend(KEY, base_url=fake.url).search("rust ownership", 5))
    (seen,) = fake.seen
    assert (seen.method, seen.path) == ("POST", "/search")
    assert seen.headers["x-api-key"] == KEY
    assert seen.body["query"] == "rust ownership"
    assert seen.body["numResults"] == 5
    assert "highlights" in seen.body["contents"]
    assert [(h.url, h.title, h.published) for h in hits] == [
        ("https://doc.example.org/ownership", "Ownership in Rust", "2024-05-01T00:00:00.000Z"),
        ("https://blog.example.com/rust", "No highlights", None),
    ]
    assert hits[0].snippet == "Each value has an owner. … Values are dropped at scope end."
    assert hits[1].snippet == ("Borrowing " * 50)  # the text's start when there are no highlights


def test_brave_gets_the_web_results_with_its_key_without_markup() -> None:
    with provider(200, json.dumps(BRAVE).encode()) as fake:
        hits = asyncio.run(BraveBackend(KEY, base_url=fake.url).search("rust ownership", 30))
    (seen,) = fake.seen
    assert (seen.method, seen.path) == ("GET", "/res/v1/web/search")
    assert seen.headers["X-Subscription-Token"] == KEY
    assert seen.query == {"q": ["rust ownership"], "count": ["20"]}  # Brave's most per page
    assert [(h.url, h.title, h.snippet, h.published) for h in hits] == [
        ("https://doc.example.org/ownership", "Understanding Ownership", "Each value in Rust has an owner.", "2024-05-01T00:00:00"),
        ("https://blog.example.com/rust", "Blog", "A post.", None),
    ]  # fmt: skip


def test_you_gets_web_then_news_results_with_its_key() -> None:
    with provider(200, json.dumps(YOU).encode()) as fake:
        hits = asyncio.run(YouBackend(KEY, base_url=fake.url).search("rust ownership", 1))
        both = asyncio.run(YouBackend(KEY, base_url=fake.url).search("rust ownership", 5))
    seen = fake.seen[0]
    assert (seen.method, seen.path) == ("GET", "/v1/search")
    assert seen.headers["X-API-Key"] == KEY
    assert seen.query == {"query": ["rust ownership"], "count": ["1"]}
    assert [h.url for h in hits] == ["https://doc.example.org/ownership"]
    assert hits[0].snippet == "Each value has an owner. … There can only be one owner at a time."
    assert [(h.url, h.snippet, h.published) for h in both[1:]] == [
        ("https://news.example.net/rust-2024", "The edition is out.", "2025-02-20T00:00:00")
    ]


@pytest.mark.parametrize("backend", [ExaBackend, BraveBackend, YouBackend])
def test_failures_are_plain_errors_that_never_show_the_key(
    backend: type[ExaBackend | BraveBackend | YouBackend], caplog: pytest.LogCaptureFixture
) -> None:
    for status, answer, message in (
        (401, b'{"error": "invalid key sk-test-secret-key"}', "answered HTTP 401"),
        (429, b"{}", "answered HTTP 429"),
        (200, b"<html>not json</html>", "was not JSON"),
    ):
        with provider(status, answer) as fake, pytest.raises(BrowserError, match=message) as caught:
            asyncio.run(backend(KEY, base_url=fake.url).search("q", 3))
        assert KEY not in str(caught.value)
    with pytest.raises(BrowserError, match="could not be reached") as caught:
        asyncio.run(backend(KEY, base_url=fake.url, timeout_s=2).search("q", 3))
    assert KEY not in caplog.text
    # An answer that is JSON but not the documented shape: no hits, no crash.
    with provider(200, b'{"results": "nope", "web": []}') as fake:
        assert asyncio.run(backend(KEY, base_url=fake.url).search("q", 3)) == []


@pytest.mark.parametrize(
    ("name", "variable"), [("exa", "EXA_API_KEY"), ("brave", "BRAVE_API_KEY"), ("you", "YDC_API_KEY")]
)
def test_a_missing_key_stops_the_start_naming_the_variable(
    name: str, variable: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = ServerSettings(browser_backend=name)
    monkeypatch.delenv(variable, raising=False)
    assert (
        settings_problem(settings)
        == f"--browser-backend {name} needs its API key in the {variable} environment variable"
    )
    with pytest.raises(ValueError, match=variable):
        make_builtin_tools(settings, len)
    monkeypatch.setenv(variable, KEY)
    assert settings_problem(settings) is None
    tools = make_builtin_tools(settings, len)
    assert tools.backend is not None
    assert tools.describe()["browser"] == {"available": True, "backend": name}
