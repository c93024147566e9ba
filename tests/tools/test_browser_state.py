"""The Browser: what the model sees for search, open and find, cursors as the reference numbers them, the
open budget, errors as plain text, the JSON call entry point, and citations."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from tests.tools.test_browser_fetch import allowing, loopback_server, reply
from tools.browser.backends import FetchedPage, SearchHit, UserLocation
from tools.browser.browser import Browser, BrowserResult, SearchOptions, UrlCitation
from tools.browser.fetch import SafeFetcher
from tools.browser.local_corpus import LocalCorpus, corpus_url
from tools.browser.searxng import SearxngBackend


def chars(text: str) -> int:
    return max(1, len(text) // 4)


def run(coroutine: Coroutine[Any, Any, BrowserResult]) -> BrowserResult:
    return asyncio.run(coroutine)


LONG = "\n".join(
    ["<html><head><title>Server-Sent Events</title></head><body><h1>Server-Sent Events</h1>",
     '<p>FastAPI streams with <a href="streaming.html">StreamingResponse</a>, see also '
     '<a href="https://html.spec.whatwg.org/sse">the spec</a>.</p>']
    + [f"<p>Paragraph {i}: filler text about events and streams, long enough to wrap over the eighty column "
       f"limit of the page view.</p>" for i in range(60)]
    + ["<p>The retry field sets the reconnection time.</p><p>Reconnecting clients send Last-Event-ID.</p>",
       "</body></html>"]
)  # fmt: skip


@pytest.fixture
def browser(tmp_path: Path) -> Browser:
    (tmp_path / "sse.html").write_text(LONG)
    (tmp_path / "streaming.html").write_text(
        "<title>StreamingResponse</title><p>Returns a streaming body. Back to <a href='sse.html'>SSE</a>.</p>"
    )
    (tmp_path / "other.md").write_text("# Unrelated\n\nNothing about the topic.\n")
    corpus = LocalCorpus(tmp_path)
    return Browser(corpus, corpus, count_tokens=chars, view_tokens=200, max_opens=3)


def header(text: str) -> tuple[str, str]:
    first, second = text.split("\n")[:2]
    return first, second


def test_search_open_scroll_and_find_take_cursors_in_call_order(browser: Browser) -> None:
    found = run(browser.search("server-sent events retry", topn=5))
    assert found.ok
    last = len(browser.pages[0].lines) - 1
    assert header(found.text) == ("[0] server-sent events retry", f"**viewing lines [0 - {last}] of {last}**")
    assert "L4:   * 【0†Server-Sent Events†corpus.local】 " in found.text

    opened = run(browser.open(0))
    assert opened.url == corpus_url("sse.html")
    first, second = header(opened.text)
    assert first == "[1] Server-Sent Events (https://corpus.local/sse.html)"
    total = len(browser.pages[1].lines) - 1
    assert re.fullmatch(rf"\*\*viewing lines \[0 - \d+\] of {total}\*\*", second)
    assert "L1: URL: https://corpus.local/sse.html" in opened.text
    assert "【0†StreamingResponse】" in opened.text
    assert (
        "【1†the \nL5: spec†html.spec.whatwg.org】" in opened.text
    )  # wrapped mid-marker, as the reference does

    scrolled = run(browser.open(loc=10, num_lines=3))
    lines = scrolled.text.split("\n")
    assert lines[:3] == [first.replace("[1]", "[2]"), f"**viewing lines [10 - 12] of {total}**", ""]
    assert lines[3:] == [f"L{i}: {browser.pages[1].lines[i]}" for i in (10, 11, 12)]

    hits = run(browser.find("RETRY field"))
    match_line = next(i for i, line in enumerate(browser.pages[1].lines) if "retry field" in line)
    shown = min(4, total + 1 - match_line)  # the heading, then up to four lines from the match on
    assert hits.text.split("\n")[:5] == [
        "[3] Find results for text: `RETRY field` in `Server-Sent Events` "
        "(https://corpus.local/sse.html/find?pattern=RETRY%20field)",
        f"**viewing lines [0 - {shown}] of {shown}**",
        "",
        f"L0: # 【0†match at L{match_line}】",
        f"L1: {browser.pages[1].lines[match_line]}",
    ]

    # A match id opens the searched page a few lines above the match, without fetching it again.
    opens = browser.opens
    back = run(browser.open(0, num_lines=2))
    assert header(back.text)[1] == f"**viewing lines [{match_line - 4} - {match_line - 3}] of {total}**"
    assert back.text.startswith("[4] Server-Sent Events (https://corpus.local/sse.html)")
    assert browser.opens == opens
    assert len(browser.pages) == 5


def test_the_default_view_fills_the_token_budget(browser: Browser) -> None:
    opened = run(browser.open(corpus_url("sse.html")))
    end = int(re.search(r"viewing lines \[0 - (\d+)\]", opened.text).group(1)) + 1
    used = sum(chars(f"L{i}: {browser.pages[0].lines[i]}\n") for i in range(end))
    assert used <= 200 < used + chars(f"L{end}: {browser.pages[0].lines[end]}\n")


def test_errors_are_plain_text_and_take_no_cursor(browser: Browser) -> None:
    assert run(browser.open(loc=3)).text == "No pages to access!"
    assert run(browser.find("x")).text == "No pages to access!"
    run(browser.search("streaming"))
    for result, expected in (
        (run(browser.open(7)), "Invalid link id `7`."),
        (run(browser.open(0, cursor=99)), "Cursor `99` is out of range. Available cursor indices: [0 - 0]."),
        (run(browser.open(loc=500)), "Invalid location parameter: `500`. Cannot exceed page maximum of 7."),
        (run(browser.find("streaming")), "Cannot run `find` on search results page or find results page"),
        (
            run(browser.open("https://corpus.local/missing.html")),
            "Error fetching URL `https://corpus.local/missing.html`: 404 for https://corpus.local/missing.html",
        ),
    ):
        assert not result.ok
        assert result.text == expected
    assert len(browser.pages) == 1
    assert run(browser.open(0)).text.startswith("[1] ")


def test_find_matches_across_wrapped_lines_ignores_markers_and_says_when_nothing_matches(
    browser: Browser,
) -> None:
    page = run(browser.open(corpus_url("sse.html")))
    assert page.ok
    lines = browser.pages[0].lines
    # A phrase that wrapping split over two lines is found at the line where it starts.
    split = next(i for i, line in enumerate(lines) if line.startswith("Paragraph 0:"))
    phrase = " ".join(lines[split].split()[-2:] + lines[split + 1].split()[:1])
    assert phrase not in lines[split]
    assert phrase not in lines[split + 1]
    hits = run(browser.find(phrase.upper(), cursor=0))
    assert f"match at L{split}】" in hits.text
    assert len(browser.pages[-1].link_lines) == 50  # every paragraph matches; the reference shows at most 50
    # Link markers are matched by their text, and on the find page they are plain text: only match ids link.
    linked = run(browser.find("see also the spec", cursor=0))
    marker_line = next(i for i, line in enumerate(lines) if "【1†the" in line)
    assert lines[marker_line + 1].startswith("spec†html.spec.whatwg.org】")  # wrapping split the marker
    assert f"L0: # 【0†match at L{marker_line}】" in linked.text
    assert "StreamingResponse, see also 〖1†the" in linked.text
    assert linked.text.count("【") == linked.text.count("】") == 1
    assert set(browser.pages[-1].links) == {0}
    none = run(browser.find("dangling", cursor=0))
    assert none.text.endswith("L0: No `find` results for pattern: `dangling`")
    assert run(browser.find("   ", cursor=0)).text == "The `find` pattern must not be empty."


def test_the_open_budget_counts_fetches_not_views(browser: Browser) -> None:
    run(browser.open(corpus_url("sse.html")))
    run(browser.open(0))  # streaming.html
    run(browser.open(0))  # back to sse.html: already fetched, so not fetched again
    assert browser.opens == 2
    run(browser.open(loc=5))
    run(browser.open(corpus_url("other.md")))
    assert browser.opens == 3
    refused = run(browser.open(corpus_url("streaming.html")))
    assert not refused.ok
    assert refused.text == "Page limit reached: at most 3 pages can be opened per response."
    assert run(browser.open(loc=1, cursor=0)).ok  # scrolling what was fetched still works


def test_browsers_do_not_share_state(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha")
    corpus = LocalCorpus(tmp_path)
    first = Browser(corpus, corpus, count_tokens=chars)
    second = Browser(corpus, corpus, count_tokens=chars)
    run(first.open(corpus_url("a.txt")))
    assert run(second.open(loc=0)).text == "No pages to access!"
    assert run(second.search("alpha")).text.startswith("[0] alpha")


def test_call_parses_the_models_json_and_reports_bad_calls_as_text(browser: Browser) -> None:
    def call(function: str, arguments: object) -> BrowserResult:
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        return run(browser.call(function, text))

    assert call("search", {"query": "streaming", "topn": 3.0}).text.startswith("[0] streaming")
    assert call("browser.open", {"id": 0, "num_lines": 2}).text.startswith("[1] ")
    assert call("open", {"id": corpus_url("other.md"), "source": "web"}).text.startswith("[2] Unrelated")
    assert call("find", {"pattern": "topic"}).ok
    assert call("open", "").ok  # no arguments: reopen the latest page
    for function, arguments, expected in (
        ("fly", {}, "Unknown function: fly"),
        ("search", "{not json", "Invalid arguments for browser.search: Expecting property name"),
        ("search", "[1]", "Invalid arguments for browser.search: the arguments must be a JSON object"),
        ("search", {"topn": 3}, "Invalid arguments for browser.search: `query` must be a string"),
        ("open", {"id": True}, "Invalid arguments for browser.open: `id` must be an integer"),
        ("open", {"loc": 2.5}, "`loc` must be an integer"),
        ("open", '{"cursor": Infinity}', "`cursor` must be an integer"),
        ("find", {"pattern": 3}, "`pattern` must be a string"),
    ):
        result = call(function, arguments)
        assert not result.ok
        assert expected in result.text
    assert len(browser.pages) == 5


def test_citations_map_cursors_to_pages_and_find_pages_to_what_they_quote(browser: Browser) -> None:
    run(browser.search("server-sent events"))  # 0: a search page cites nothing
    run(browser.open(corpus_url("sse.html")))  # 1
    run(browser.find("retry field"))  # 2
    match_line = browser.pages[2].link_lines[0]

    assert browser.citation(1, 4, 6).url == corpus_url("sse.html")
    assert browser.citation(1, 6, 4).first_line == 4  # a reversed range is read in order
    quoted = browser.citation(2, 1, 2)
    assert (quoted.url, quoted.title) == (corpus_url("sse.html"), "Server-Sent Events")
    assert (quoted.first_line, quoted.last_line) == (match_line, match_line + 1)
    assert browser.citation(2, 0, 0).first_line is None  # the heading line quotes nothing
    assert browser.citation(0, 1, 1) is None
    assert browser.citation(9, 1, 1) is None
    assert browser.citation(1, 1, 10_000) is None

    text, annotations = browser.cite(
        "Per the page【1†L4-L6】 and the find【2†L1】, not the search【0†L2】 or【9†L1】."
    )
    link = "([corpus.local](https://corpus.local/sse.html))"
    assert text == f"Per the page {link}  and the find {link} , not the search【0†L2】 or【9†L1】."
    assert annotations == [
        UrlCitation(13, 13 + len(link), corpus_url("sse.html"), "Server-Sent Events", 4, 6),
        UrlCitation(text.index(link, 14), text.index(link, 14) + len(link), corpus_url("sse.html"),
                    "Server-Sent Events", match_line, match_line),
    ]  # fmt: skip
    for annotation in annotations:
        assert text[annotation.start_index : annotation.end_index] == link
    assert browser.cite("no marks") == ("no marks", [])


def test_searxng_results_open_through_the_guarded_fetcher() -> None:
    with loopback_server({"/": reply(body=b"<title>Home</title><p>welcome home</p>")}) as site:
        results = {"results": [{"url": site.url("/"), "title": "Home", "content": "the home page"}]}
        routes = {"/search": reply(body=json.dumps(results).encode(), content_type="application/json")}
        with loopback_server(routes) as searx:
            backend = SearxngBackend(searx.url())
            guarded = Browser(backend, SafeFetcher(), count_tokens=chars)
            assert "【0†Home†127.0.0.1】 the home page" in run(guarded.search("home")).text
            refused = run(guarded.open(0))
            assert refused.text.startswith(f"Error fetching URL `{site.url('/')}`: refused: port")
            assert site.hits == []
            allowed = Browser(backend, SafeFetcher(allowing(site)), count_tokens=chars)
            run(allowed.search("home"))
            opened = run(allowed.open(0))
    assert opened.text.startswith(f"[1] Home ({site.url('/')})")
    assert "welcome home" in opened.text
    assert allowed.source == "web"


class FakeWeb:
    """A search backend and fetcher over a few pages on several domains, recording what it was asked (and,
    located, the location it got)."""

    name = "web"

    def __init__(self, *, uses_location: bool = False, redirects: dict[str, str] | None = None) -> None:
        self.uses_location = uses_location
        self.redirects = redirects or {}
        self.pages = {
            f"https://{host}/{i}": f"<title>{host} {i}</title><p>text about ferries on {host}</p>"
            for host in ("docs.example.org", "example.org", "evil.example.net")
            for i in range(10)
        }
        self.asked: list[tuple[str, int, UserLocation | None]] = []
        self.fetched: list[str] = []

    async def search(self, query: str, topn: int, location: UserLocation | None = None) -> list[SearchHit]:
        self.asked.append((query, topn, location))
        return [SearchHit(url, url, "ferries") for url in list(self.pages)[::-1][:topn]]

    async def fetch(self, url: str) -> FetchedPage:
        self.fetched.append(url)
        final = self.redirects.get(url, url)
        return FetchedPage(final, "text/html", self.pages[final])


def test_allowed_domains_filter_results_and_every_page_opened() -> None:
    web = FakeWeb(redirects={"https://example.org/1": "https://evil.example.net/1"})
    options = SearchOptions(allowed_domains=("example.org",))
    browser = Browser(web, web, count_tokens=chars, options=options)
    found = run(browser.search("ferries", topn=5))
    # The backend was asked for all it gives, and only the allowed domain and its subdomains are shown.
    assert web.asked[0][1] == 20
    assert "evil.example.net" not in found.text
    assert found.text.count("†docs.example.org】") + found.text.count("†example.org】") == 5
    refused = run(browser.open("https://evil.example.net/3"))
    assert not refused.ok
    assert refused.text == (
        "`https://evil.example.net/3` is outside the domains this search may use: example.org."
    )
    assert web.fetched == []  # refused before any fetch
    # A redirect out of the allowed domains is refused too (the fetcher followed it; nothing is shown).
    assert not run(browser.open("https://example.org/1")).ok
    assert run(browser.open("https://docs.example.org/2")).ok
    # A page an earlier turn opened, outside a later request's filters, cannot be opened or scrolled.
    run(browser.open("https://example.org/4"))
    later = browser.fork(SearchOptions(allowed_domains=("docs.example.org",)))
    assert not run(later.open(loc=1)).ok
    assert not run(later.find("ferries")).ok
    assert run(later.open(loc=1, cursor=1)).ok


def test_context_size_sets_the_results_and_the_page_window() -> None:
    web = FakeWeb()
    low = Browser(web, web, count_tokens=chars, options=SearchOptions(context_size="low"))
    high = Browser(web, web, count_tokens=chars, options=SearchOptions(context_size="high"))
    medium = Browser(web, web, count_tokens=chars)
    for browser in (low, medium, high):
        run(browser.call("search", '{"query": "ferries"}'))
        run(browser.call("search", '{"query": "ferries", "topn": 50}'))
    assert [topn for _, topn, _ in web.asked] == [5, 5, 10, 20, 20, 20]
    assert (low.view_tokens, medium.view_tokens, high.view_tokens) == (512, 1024, 2048)


def test_the_location_goes_only_to_backends_that_localize() -> None:
    where = UserLocation(country="GB", city="London")
    located, plain = FakeWeb(uses_location=True), FakeWeb()
    for web in (located, plain):
        run(Browser(web, web, count_tokens=chars, options=SearchOptions(location=where)).search("ferries"))
    assert located.asked[0][2] == where
    assert plain.asked[0][2] is None
