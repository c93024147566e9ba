"""Search backends: the local corpus (search quality, fetch, what it refuses to serve) and SearXNG (a fake
instance on loopback)."""

from __future__ import annotations

import asyncio
import json
import os
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.tools.test_browser_fetch import loopback_server, reply
from tools.browser.backends import BrowserError
from tools.browser.local_corpus import LocalCorpus, corpus_url
from tools.browser.searxng import SearxngBackend

DOCS = {
    "rust/borrowing.md": "# References and Borrowing\n\nA reference borrows a value without taking ownership. "
    "Mutable references are exclusive: while one is borrowed mutably, no other reference may exist.\n",
    "rust/unsafe.md": "# Unsafe Rust\n\nRaw pointers can be dereferenced only in unsafe blocks. A pointer may "
    "dangle, unlike a reference.\n",
    "rust/ownership.html": "<html><head><title>What is Ownership?</title><script>var ownership = 'noise';"
    "</script></head><body><h1>Ownership</h1><p>Each value has an owner. When the owner goes out of scope the "
    'value is dropped. See <a href="borrowing.md">borrowing</a>.</p></body></html>',
    "python/asyncio.txt": "asyncio event loop\n\nThe event loop runs coroutines and callbacks; never block it "
    "with slow synchronous calls such as time.sleep.\n",
    "python/gil.md": "# The GIL\n\nThe global interpreter lock lets one thread run Python bytecode at a time.\n",
    "cooking/bread.html": "<title>Sourdough bread</title><p>Flour, water, salt and a starter. Let the dough "
    "rise overnight.</p>",
    "notes/ignored.pdf": "%PDF not indexed",
}


@pytest.fixture
def corpus(tmp_path: Path) -> LocalCorpus:
    root = tmp_path / "corpus"
    for relpath, text in DOCS.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    outside = tmp_path / "secret.txt"
    outside.write_text("the server's secret, outside the corpus")
    os.symlink(outside, root / "notes" / "leak.txt")
    return LocalCorpus(root)


def search(backend: LocalCorpus | SearxngBackend, query: str, topn: int = 5) -> list[str]:
    return [hit.url for hit in asyncio.run(backend.search(query, topn))]


def test_only_text_files_inside_the_root_are_indexed(corpus: LocalCorpus) -> None:
    assert len(corpus) == 6
    assert search(corpus, "secret server") == []
    with pytest.raises(BrowserError, match="404"):
        asyncio.run(corpus.fetch(corpus_url("notes/leak.txt")))


@pytest.mark.parametrize(
    ("query", "best"),
    [
        ("ownership borrowing references", "rust/borrowing.md"),  # stems: borrowing ~ borrows, borrowed
        ("what is ownership", "rust/ownership.html"),  # the title weighs more than a passing mention
        ("raw pointer dereference", "rust/unsafe.md"),
        ("blocking the event loop", "python/asyncio.txt"),
        ("global interpreter lock threads", "python/gil.md"),
        ("how long should sourdough rise", "cooking/bread.html"),
    ],
)
def test_search_ranks_the_relevant_document_first(corpus: LocalCorpus, query: str, best: str) -> None:
    assert search(corpus, query)[0] == corpus_url(best)


def test_search_results_carry_titles_snippets_and_respect_topn(corpus: LocalCorpus) -> None:
    hits = asyncio.run(corpus.search("reference ownership value", 2))
    assert len(hits) == 2
    assert hits[0].title == "References and Borrowing"
    assert "reference" in hits[0].snippet.lower()
    assert search(corpus, "ownership") == [corpus_url("rust/ownership.html"), corpus_url("rust/borrowing.md")]
    # Script text is not page text, so it is not searchable either: "noise" appears only in a <script>.
    assert search(corpus, "noise") == []
    assert search(corpus, "zebra quantum") == []
    assert search(corpus, '"" OR * NEAR( -') == []  # FTS5 syntax in a query is only text, never an error
    assert search(corpus, "sourdough", topn=0) == []


def test_fetch_returns_the_document_by_its_pseudo_url(corpus: LocalCorpus) -> None:
    page = asyncio.run(corpus.fetch("https://corpus.local/rust/ownership.html"))
    assert page.content_type == "text/html"
    assert "Each value has an owner" in page.text
    assert asyncio.run(corpus.fetch(corpus_url("python/gil.md"))).content_type == "text/markdown"
    for url in (
        "https://corpus.local/../secret.txt",
        "https://corpus.local/rust/../../secret.txt",
        "http://corpus.local/rust/unsafe.md",
        "https://elsewhere.example/rust/unsafe.md",
        "https://corpus.local/notes/ignored.pdf",
    ):
        with pytest.raises(BrowserError, match="404"):
            asyncio.run(corpus.fetch(url))


def test_paths_with_spaces_round_trip(tmp_path: Path) -> None:
    (tmp_path / "a dir").mkdir()
    (tmp_path / "a dir" / "my notes.txt").write_text("kittens and yarn")
    corpus = LocalCorpus(tmp_path)
    (url,) = search(corpus, "kittens")
    assert url == "https://corpus.local/a%20dir/my%20notes.txt"
    assert asyncio.run(corpus.fetch(url)).text == "kittens and yarn"


SEARX_RESULTS = {
    "query": "fastapi sse",
    "results": [
        {"url": "https://docs.example.org/sse", "title": "SSE in FastAPI", "content": "Stream events.",
         "publishedDate": "2025-01-02T00:00:00"},
        {"url": "magnet:?xt=urn:btih:abc", "title": "not a web page", "content": ""},
        {"url": "https://docs.example.org/sse", "title": "duplicate", "content": "again"},
        {"url": "https://other.example.com/spec", "title": "", "content": None},
        {"url": "https://third.example.net/", "title": "Third", "content": "three"},
    ],
}  # fmt: skip


def test_searxng_asks_for_json_and_maps_results() -> None:
    with loopback_server(
        {"/search": reply(body=json.dumps(SEARX_RESULTS).encode(), content_type="application/json")}
    ) as searx:
        backend = SearxngBackend(searx.url("/"), language="en")
        hits = asyncio.run(backend.search("fastapi sse", 2))
        assert len(asyncio.run(backend.search("fastapi sse", 10))) == 3
    assert [(h.url, h.title, h.snippet, h.published) for h in hits] == [
        ("https://docs.example.org/sse", "SSE in FastAPI", "Stream events.", "2025-01-02T00:00:00"),
        ("https://other.example.com/spec", "https://other.example.com/spec", "", None),
    ]
    path, _ = searx.hits[0]
    assert urlsplit(path).path == "/search"
    assert parse_qs(urlsplit(path).query) == {"q": ["fastapi sse"], "format": ["json"], "language": ["en"]}
    assert backend.name == "web"


def test_searxng_failures_are_plain_errors() -> None:
    def huge(request: BaseHTTPRequestHandler) -> None:
        reply(
            body=b'{"results": [' + b'{"url": "https://x.example/"},' * 100_000 + b"{}]}",
            content_type="application/json",
        )(request)

    routes = {"/forbidden/search": reply(403, b"Forbidden"), "/html/search": reply(body=b"<html>not json</html>"),
              "/huge/search": huge}  # fmt: skip
    with loopback_server(routes) as searx:
        for base, message in (
            ("/forbidden", "answered HTTP 403"),
            ("/html", "was not JSON"),
            ("/huge", "too large"),
        ):
            with pytest.raises(BrowserError, match=message):
                asyncio.run(SearxngBackend(searx.url(base)).search("q", 5))
    # Nothing listens there any more: the error says the service could not be reached, with no traceback.
    with pytest.raises(BrowserError, match="could not be reached"):
        asyncio.run(SearxngBackend(searx.url("/"), timeout_s=2).search("q", 5))
