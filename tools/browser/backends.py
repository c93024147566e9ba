"""Where search results and page contents come from: the seams the browser tool is built on.

Searching and fetching are separate, as they are in practice: a SearXNG instance finds pages that the SSRF-
guarded fetcher then opens, while a local corpus does both. The browser owns everything the model sees
(rendering, cursors, citations); backends only return plain data.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

# The highlighting tags some search services put in their results' text.
_TAG = re.compile(r"<[^>]*>")


class BrowserError(Exception):
    """A failure the model should read about (as plain text in the tool message), not a server error."""


@dataclass(frozen=True, slots=True)
class SearchHit:
    url: str
    title: str
    snippet: str
    published: str | None = None


@dataclass(frozen=True, slots=True)
class UserLocation:
    """Where the user roughly is, as a request gives it (OpenAI's `user_location`): for the backends that
    can localize results (see `LocatedSearch`)."""

    country: str | None = None  # ISO 3166-1 alpha-2, upper case: "GB"
    region: str | None = None
    city: str | None = None
    timezone: str | None = None  # IANA: "Europe/London"


@dataclass(frozen=True, slots=True)
class FetchedPage:
    """A fetched document, already capped in size: its final URL (after redirects), media type and text (a
    PDF's: extracted, with the title its metadata gives)."""

    url: str
    content_type: str  # the media type only, lower case, no parameters: "text/html"
    text: str
    title: str | None = None


class SearchBackend(Protocol):
    # Shown to the model as `sources=<name>` in the browser tool's description.
    name: str

    async def search(self, query: str, topn: int) -> list[SearchHit]:
        """At most `topn` hits, best first. Raises BrowserError when the search cannot be done."""
        ...


class LocatedSearch(Protocol):
    """A backend that can localize its results: it sets `uses_location = True` and takes the request's
    location (the browser then calls `search(query, topn, location=...)`; other backends never get one)."""

    uses_location: bool

    async def search(
        self, query: str, topn: int, *, location: UserLocation | None = None
    ) -> list[SearchHit]: ...


class PageFetcher(Protocol):
    async def fetch(self, url: str) -> FetchedPage:
        """The document at `url`. Raises BrowserError when it cannot (or may not) be fetched."""
        ...


def search_hits(
    results: Any, topn: int, snippet: Callable[[dict[str, Any]], str], published: str
) -> list[SearchHit]:
    """A search service's JSON results as hits: the http(s) ones only (engines also return magnet: and other
    links the browser could not open), the first of each URL, at most `topn`; `snippet(result)` picks a
    result's text and `published` names its date field."""
    hits: list[SearchHit] = []
    seen: set[str] = set()
    for result in results if isinstance(results, list) else []:
        if not isinstance(result, dict):
            continue
        url = result.get("url")
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or url in seen:
            continue
        seen.add(url)
        date = result.get(published)
        hits.append(
            SearchHit(
                url=url,
                title=plain_text(result.get("title")) or url,
                snippet=snippet(result),
                published=date if isinstance(date, str) else None,
            )
        )
        if len(hits) >= topn:
            break
    return hits


def plain_text(value: Any) -> str:
    """A result field's text without the highlighting tags some services put in it ("" if not text)."""
    return _TAG.sub("", value) if isinstance(value, str) else ""
