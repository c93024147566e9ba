"""The browser tool's state for one response chain: the pages the model has seen, by cursor; its citations.

Behaviour follows the gpt-oss reference, which the model was trained on: every successful `search`, `open`
(scrolling included) and `find` shows a page under a new cursor, numbered 0, 1, 2, ... in call order (so one
URL can sit under several cursors); a failed call shows nothing and takes no cursor; errors are plain text.
Where the reference has quirks, this fixes them: `search` honours `topn` (up to 20), `find` refuses search and
find pages (as its own message always said), a find page's links are its match ids only, and a citation of a
find page points at the page it quotes, with that page's line numbers.

A `Browser` must never be shared between requests: cursors, pages and the open budget belong to one response
chain, and another request could otherwise read pages fetched for someone else.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import quote, urlsplit

from tools.browser.backends import (
    BrowserError,
    FetchedPage,
    LocatedSearch,
    PageFetcher,
    SearchBackend,
    UserLocation,
)
from tools.browser.page import (
    LINK_MARKER,
    VIEW_TOKENS,
    PageContents,
    PageKind,
    TokenCounter,
    html_to_page,
    neutralise,
    render_view,
    text_to_page,
    view_end,
)

logger = logging.getLogger(__name__)

MAX_SEARCH_RESULTS = 20
MAX_FIND_RESULTS = 50  # as the reference
FIND_CONTEXT_LINES = 4  # lines shown per find match, the matching one first
_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
# `【{cursor}†L{a}】` or `【{cursor}†L{a}-L{b}】`, as the browser's tool description teaches the model.
CITATION = re.compile(r"【(\d+)†L(\d+)(?:-L(\d+))?】")
_SPACES = re.compile(r"\s+")


ContextSize = Literal["low", "medium", "high"]
# What OpenAI's `search_context_size` buys here: (results a search shows when the model asks for no number,
# most results a search shows, tokens of a page's view). "medium" is the reference's behaviour, which the
# model was trained on (10 results by default, a window of about 1024 tokens).
CONTEXT_SIZES: dict[str, tuple[int, int, int]] = {
    "low": (5, 5, VIEW_TOKENS // 2),
    "medium": (10, MAX_SEARCH_RESULTS, VIEW_TOKENS),
    "high": (MAX_SEARCH_RESULTS, MAX_SEARCH_RESULTS, VIEW_TOKENS * 2),
}


@dataclass(frozen=True, slots=True)
class SearchOptions:
    """What one request asks of its browser (OpenAI's web search options): the domains it may search and
    open (empty: all; a domain allows its subdomains), the user's location for backends that localize, and
    how much context searches and pages take."""

    allowed_domains: tuple[str, ...] = ()
    location: UserLocation | None = None
    context_size: ContextSize = "medium"

    def allows(self, url: str) -> bool:
        if not self.allowed_domains:
            return True
        host = (urlsplit(url).hostname or "").rstrip(".").lower()
        return any(host == domain or host.endswith("." + domain) for domain in self.allowed_domains)


class ToolUsageError(BrowserError):
    """The model asked for something that does not exist (a cursor, a link id) or is over a limit: the message
    is shown as it is, not as a failed fetch."""


@dataclass(frozen=True, slots=True)
class BrowserResult:
    text: str  # what the model reads in the tool message
    ok: bool
    url: str | None = None  # the page shown, for the API's web_search_call actions ("" for search pages)


@dataclass(frozen=True, slots=True)
class Citation:
    url: str
    title: str
    first_line: int | None  # lines of the page at `url`; None when a find page's cited lines quote nothing
    last_line: int | None


@dataclass(frozen=True, slots=True)
class UrlCitation:
    """A `url_citation` annotation over the text `cite` returns: [start_index, end_index) in characters."""

    start_index: int
    end_index: int
    url: str
    title: str
    first_line: int | None
    last_line: int | None


class Browser:
    def __init__(
        self,
        backend: SearchBackend,
        fetcher: PageFetcher,
        *,
        count_tokens: TokenCounter,
        view_tokens: int | None = None,
        max_opens: int = 10,
        options: SearchOptions = SearchOptions(),
    ) -> None:
        """`count_tokens` counts tokens the way the model's tokenizer does: the default view is as many lines
        as fit in `view_tokens` (by default, what `options.context_size` gives). `max_opens` caps the pages
        fetched in this response chain."""
        self.backend = backend
        self.fetcher = fetcher
        self.count_tokens = count_tokens
        self.options = options
        self.default_results, self.max_results, sized_view = CONTEXT_SIZES[options.context_size]
        self.view_tokens = sized_view if view_tokens is None else view_tokens
        self.max_opens = max_opens
        self.pages: list[PageContents] = []  # cursor -> page shown
        self.opens = 0
        self._fetched: dict[str, PageContents] = {}  # url -> page, so following a link twice fetches once

    def fork(self, options: SearchOptions | None = None) -> Browser:
        """A browser for a response that continues this one's chain: the same pages under the same cursors,
        but its own from now on (another continuation of the same response never sees its pages), with a
        fresh open budget, and the continuing request's `options` (None: these)."""
        options = self.options if options is None else options
        other = Browser(
            self.backend,
            self.fetcher,
            count_tokens=self.count_tokens,
            view_tokens=None if options != self.options else self.view_tokens,
            max_opens=self.max_opens,
            options=options,
        )
        other.pages = list(self.pages)
        other._fetched = dict(self._fetched)
        return other

    @property
    def source(self) -> str:
        """For the tool description's `sources=` line."""
        return self.backend.name

    async def call(self, function: str, arguments: str) -> BrowserResult:
        """Run `browser.<function>` with the JSON `arguments` the model wrote; every failure is a message to
        the model, never an exception."""
        name = function.removeprefix("browser.")
        try:
            args = json.loads(arguments) if arguments.strip() else {}
            if not isinstance(args, dict):
                raise ValueError("the arguments must be a JSON object")
            if name == "search":
                return await self.search(_str(args, "query"), _int(args, "topn", self.default_results))
            if name == "open":
                target = args.get("id", -1)
                if not isinstance(target, str):
                    target = _int(args, "id", -1)
                return await self.open(target, _int(args, "cursor", -1), _int(args, "loc", -1),
                                       _int(args, "num_lines", -1))  # fmt: skip
            if name == "find":
                return await self.find(_str(args, "pattern"), _int(args, "cursor", -1))
            return BrowserResult(f"Unknown function: {name}", ok=False)
        except ValueError as exc:  # json.JSONDecodeError included
            return BrowserResult(f"Invalid arguments for browser.{name}: {exc}", ok=False)
        except BrowserError as exc:
            return BrowserResult(str(exc), ok=False)

    async def search(self, query: str, topn: int = 10) -> BrowserResult:
        topn = max(1, min(topn, self.max_results))
        # With allowed domains, hits elsewhere are dropped here whatever the backend did with them: ask for
        # the most it gives, so that the filter leaves some.
        asked = MAX_SEARCH_RESULTS if self.options.allowed_domains else topn
        location = self.options.location
        try:
            if location is not None and getattr(self.backend, "uses_location", False):
                hits = await cast(LocatedSearch, self.backend).search(query, asked, location=location)
            else:
                hits = await self.backend.search(query, asked)
        except BrowserError as exc:
            return BrowserResult(f"Error searching for `{query}`: {exc}", ok=False)
        hits = [hit for hit in hits if self.options.allows(hit.url)]
        # As the reference: hits become a small HTML list, read like any page (the layout the model saw).
        items = "".join(
            f'<li><a href="{html.escape(hit.url)}">{html.escape(hit.title)}</a> {html.escape(hit.snippet)}'
            for hit in hits[:topn]
        )
        body = f"<ul>{items}</ul>" if items else "<p>No results found.</p>"
        document = f"<html><body><h1>Search Results</h1>{body}</body></html>"
        page = await asyncio.to_thread(html_to_page, document, "", query, PageKind.SEARCH)
        return await self._shown(page, 0, -1)

    async def open(
        self, id: int | str = -1, cursor: int = -1, loc: int = -1, num_lines: int = -1
    ) -> BrowserResult:
        """Open a URL (`id` a string), link `id` of the page at `cursor`, or (no `id`) scroll that page."""
        url: str | None = None
        try:
            if isinstance(id, str):
                # A URL the model names is fetched afresh, as in the reference.
                url = id
                page = await self._fetch(url)
            else:
                current = self._page(cursor)
                if id < 0:
                    page = current
                elif id not in current.links:
                    raise ToolUsageError(f"Invalid link id `{id}`.")
                elif current.kind is PageKind.FIND and current.source is not None:
                    # A find match opens the searched page a few lines above the match.
                    page = current.source
                    if loc < 0:
                        loc = max(0, current.link_lines[id] - FIND_CONTEXT_LINES)
                else:
                    url = current.links[id]
                    page = self._fetched.get(url) or await self._fetch(url)
            if page.kind is PageKind.PAGE:
                # Also a page shown before (cached, or opened by an earlier turn under other filters).
                self._check_allowed(page.url)
        except ToolUsageError as exc:
            return BrowserResult(str(exc), ok=False)
        except BrowserError as exc:
            return BrowserResult(f"Error fetching URL `{url}`: {exc}", ok=False, url=url)
        return await self._shown(page, max(loc, 0), num_lines)

    async def find(self, pattern: str, cursor: int = -1) -> BrowserResult:
        try:
            page = self._page(cursor)
        except BrowserError as exc:
            return BrowserResult(str(exc), ok=False)
        if page.kind is not PageKind.PAGE:
            return BrowserResult("Cannot run `find` on search results page or find results page", ok=False)
        if not self.options.allows(page.url):
            return BrowserResult(self._outside(page.url), ok=False)
        needle = _SPACES.sub(" ", pattern.lower()).strip()
        if not needle:
            return BrowserResult("The `find` pattern must not be empty.", ok=False)

        # Link markers are matched by their text only. Each line is read with the next joined on, so a phrase
        # (or a marker) that wrapping split still matches, at the line where it starts.
        def plain(text: str) -> str:
            return _SPACES.sub(" ", LINK_MARKER.sub(r"\1", text).lower())

        lines: list[str] = []
        origin: list[int | None] = []
        link_lines: dict[int, int] = {}
        for i, line in enumerate(page.lines):
            following = page.lines[i + 1] if i + 1 < len(page.lines) else ""
            if needle not in plain(line) and (
                needle in plain(following) or needle not in plain(f"{line} {following}")
            ):
                continue
            match_id = len(link_lines)
            link_lines[match_id] = i
            if lines:
                lines.append("")
                origin.append(None)
            lines.append(f"# 【{match_id}†match at L{i}】")
            origin.append(None)
            for j in range(i, min(i + FIND_CONTEXT_LINES, len(page.lines))):
                # On this page only match ids are links: the page's own markers are reduced to their text, and
                # the halves of one that wrapping split lose their brackets.
                lines.append(neutralise(LINK_MARKER.sub(r"\1", page.lines[j])))
                origin.append(j)
            if len(link_lines) >= MAX_FIND_RESULTS:
                break
        if not lines:
            lines, origin = [f"No `find` results for pattern: `{pattern}`"], [None]
        found = PageContents(
            url=f"{page.url}/find?pattern={quote(pattern)}",
            title=f"Find results for text: `{pattern}` in `{page.title}`",
            lines=lines,
            links={match_id: page.url for match_id in link_lines},
            kind=PageKind.FIND,
            source=page,
            link_lines=link_lines,
            line_origin=origin,
        )
        return await self._shown(found, 0, -1)

    def citation(self, cursor: int, first_line: int, last_line: int) -> Citation | None:
        """What `【cursor†Lfirst-Llast】` cites, or None when it cites nothing (an unknown cursor, a search
        page, lines the page does not have)."""
        if not 0 <= cursor < len(self.pages):
            return None
        page = self.pages[cursor]
        first_line, last_line = sorted((first_line, last_line))
        if page.kind is PageKind.SEARCH or last_line >= len(page.lines):
            return None
        if page.kind is PageKind.FIND and page.source is not None and page.line_origin is not None:
            quoted = [n for n in page.line_origin[first_line : last_line + 1] if n is not None]
            source = page.source
            if not quoted:
                return Citation(source.url, source.title, None, None)
            return Citation(source.url, source.title, min(quoted), max(quoted))
        return Citation(page.url, page.title, first_line, last_line)

    def cite(self, text: str) -> tuple[str, list[UrlCitation]]:
        """Replace the model's citation marks with ` ([domain](url)) ` and return the annotations over the new
        text, as the reference does; marks that cite nothing are left as written."""
        out: list[str] = []
        annotations: list[UrlCitation] = []
        position = 0
        length = 0
        for match in CITATION.finditer(text):
            first = int(match.group(2))
            last = int(match.group(3)) if match.group(3) else first
            found = self.citation(int(match.group(1)), first, last)
            if found is None:
                continue
            before = text[position : match.start()]
            link = f"([{urlsplit(found.url).hostname or found.url}]({found.url}))"
            out.append(f"{before} {link} ")
            start = length + len(before) + 1
            annotations.append(
                UrlCitation(
                    start, start + len(link), found.url, found.title, found.first_line, found.last_line
                )
            )
            length += len(before) + len(link) + 2
            position = match.end()
        out.append(text[position:])
        return "".join(out), annotations

    def _page(self, cursor: int) -> PageContents:
        if not self.pages:
            raise ToolUsageError("No pages to access!")
        if cursor == -1:
            return self.pages[-1]
        if not 0 <= cursor < len(self.pages):
            raise ToolUsageError(
                f"Cursor `{cursor}` is out of range. Available cursor indices: [0 - {len(self.pages) - 1}]."
            )
        return self.pages[cursor]

    def _check_allowed(self, url: str) -> None:
        if not self.options.allows(url):
            raise ToolUsageError(self._outside(url))

    def _outside(self, url: str) -> str:
        return (
            f"`{url}` is outside the domains this search may use: {', '.join(self.options.allowed_domains)}."
        )

    async def _fetch(self, url: str) -> PageContents:
        self._check_allowed(url)
        if self.opens >= self.max_opens:
            raise ToolUsageError(
                f"Page limit reached: at most {self.max_opens} pages can be opened per response."
            )
        self.opens += 1
        fetched = await self.fetcher.fetch(url)
        self._check_allowed(fetched.url)  # where its redirects led
        page = await asyncio.to_thread(_to_page, fetched)
        self._fetched[url] = page
        self._fetched[page.url] = page
        return page

    async def _shown(self, page: PageContents, loc: int, num_lines: int) -> BrowserResult:
        """`_show` in a worker thread: sizing the view counts tokens line by line, which is no work for an
        event loop (and a thread's first use of the tokenizer holds the GIL a while)."""
        return await asyncio.to_thread(self._show, page, loc, num_lines)

    def _show(self, page: PageContents, loc: int, num_lines: int) -> BrowserResult:
        total = len(page.lines)
        if loc >= total:
            message = f"Invalid location parameter: `{loc}`. Cannot exceed page maximum of {total - 1}."
            return BrowserResult(message, ok=False)
        end = view_end(page.lines, loc, num_lines, self.count_tokens, self.view_tokens)
        self.pages.append(page)
        cursor = len(self.pages) - 1
        logger.debug("browser cursor %d: %s lines %d-%d", cursor, page.url or page.title, loc, end - 1)
        return BrowserResult(render_view(page, cursor, loc, end), ok=True, url=page.url)


def _to_page(fetched: FetchedPage) -> PageContents:
    if fetched.content_type in _HTML_TYPES:
        return html_to_page(fetched.text, fetched.url)
    return text_to_page(fetched.text, fetched.url, fetched.title)


def _str(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str):
        raise ValueError(f"`{key}` must be a string")
    return value


def _int(args: dict[str, Any], key: str, default: int) -> int:
    value = args.get(key, default)
    # JSON numbers may arrive as 5.0; booleans are ints to Python but not to the model's schema.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"`{key}` must be an integer")
    if isinstance(value, float) and not value.is_integer():  # 2.5, inf and nan
        raise ValueError(f"`{key}` must be an integer")
    return int(value)
