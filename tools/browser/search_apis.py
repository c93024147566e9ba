"""Web search through hosted search APIs: Exa, Brave and You.com, each with its key from the environment.

They find pages; the SSRF-guarded fetcher opens them, as for SearXNG. Each answer is capped in size and time,
no proxy variables are used and no redirect is followed (the provider answers, or nothing does). The key goes
only into the request's header to its provider: never into a log line, an error the model reads, or a page.

* exa: `POST {base}/search` with `{"query", "numResults", "contents": {"highlights": ...}}`, the key
  (`EXA_API_KEY`) in `x-api-key`; hits in `results[]` (`url`, `title`, `highlights` or `text`,
  `publishedDate`).
* brave: `GET {base}/res/v1/web/search?q&count`, the key (`BRAVE_API_KEY`) in `X-Subscription-Token`; hits in
  `web.results[]` (`url`, `title`, `description` with HTML emphasis, `page_age`).
* you (You.com): `GET {base}/v1/search?query&count`, the key (`YDC_API_KEY`) in `X-API-Key`; hits in
  `results.web[]` then `results.news[]` (`url`, `title`, `description`, `snippets`, `page_age`).

The base URLs are the providers' own; tests point them at a loopback server.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import httpx

from tools.browser.backends import BrowserError, SearchHit, plain_text, search_hits

logger = logging.getLogger(__name__)

# A results page is some tens of KiB; anything far bigger is not a search answer.
MAX_RESPONSE_BYTES = 2 << 20

# The environment variable each backend reads its key from.
API_KEYS = {"exa": "EXA_API_KEY", "brave": "BRAVE_API_KEY", "you": "YDC_API_KEY"}


def api_key(backend: str) -> str | None:
    """The key `backend` needs, from its environment variable; None when it is unset or empty."""
    return os.environ.get(API_KEYS[backend]) or None


class _ApiBackend:
    provider = ""

    def __init__(
        self,
        key: str,
        *,
        base_url: str,
        name: str = "web",
        timeout_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not key:
            raise ValueError(f"the {self.provider} backend needs an API key")
        self._key = key
        self.base_url = base_url.rstrip("/")
        self.name = name
        self.timeout_s = timeout_s
        self._transport = transport

    async def _json(self, method: str, path: str, headers: dict[str, str], **request: Any) -> Any:
        """The provider's JSON answer; BrowserError (saying nothing of the key) when there is none."""
        async with httpx.AsyncClient(
            timeout=self.timeout_s, trust_env=False, follow_redirects=False, transport=self._transport
        ) as client:
            try:
                async with client.stream(
                    method, self.base_url + path, headers={"Accept": "application/json", **headers}, **request
                ) as response:
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_RESPONSE_BYTES:
                            raise BrowserError("search failed: the search service's answer was too large")
            except httpx.HTTPError as exc:
                logger.warning("%s search: %s", self.provider, type(exc).__name__)
                raise BrowserError("search failed: the search service could not be reached") from exc
        if response.status_code != 200:
            # 401/403: a bad key, 429: over quota. The operator reads it in the log; the model, the status.
            logger.warning("%s search answered HTTP %d", self.provider, response.status_code)
            raise BrowserError(f"search failed: the search service answered HTTP {response.status_code}")
        try:
            return json.loads(body)
        except ValueError as exc:
            raise BrowserError("search failed: the search service's answer was not JSON") from exc


class ExaBackend(_ApiBackend):
    provider = "exa"

    def __init__(self, key: str, *, base_url: str = "https://api.exa.ai", **options: Any) -> None:
        super().__init__(key, base_url=base_url, **options)

    async def search(self, query: str, topn: int) -> list[SearchHit]:
        body = {"query": query, "numResults": topn, "contents": {"highlights": {"numSentences": 3}}}
        answer = await self._json("POST", "/search", {"x-api-key": self._key}, json=body)

        def snippet(result: dict[str, Any]) -> str:
            highlights = result.get("highlights")
            if isinstance(highlights, list) and highlights:
                return " … ".join(plain_text(h) for h in highlights)
            return plain_text(result.get("summary")) or plain_text(result.get("text"))[:500]

        return search_hits(
            answer.get("results") if isinstance(answer, dict) else None, topn, snippet, "publishedDate"
        )


class BraveBackend(_ApiBackend):
    provider = "brave"

    def __init__(self, key: str, *, base_url: str = "https://api.search.brave.com", **options: Any) -> None:
        super().__init__(key, base_url=base_url, **options)

    async def search(self, query: str, topn: int) -> list[SearchHit]:
        params = {"q": query, "count": min(topn, 20)}  # Brave answers at most 20 a page
        answer = await self._json(
            "GET", "/res/v1/web/search", {"X-Subscription-Token": self._key}, params=params
        )
        web = answer.get("web") if isinstance(answer, dict) else None
        results = web.get("results") if isinstance(web, dict) else None
        return search_hits(results, topn, lambda result: plain_text(result.get("description")), "page_age")


class YouBackend(_ApiBackend):
    provider = "you"

    def __init__(self, key: str, *, base_url: str = "https://ydc-index.io", **options: Any) -> None:
        super().__init__(key, base_url=base_url, **options)

    async def search(self, query: str, topn: int) -> list[SearchHit]:
        params = {"query": query, "count": topn}
        answer = await self._json("GET", "/v1/search", {"X-API-Key": self._key}, params=params)
        found = answer.get("results") if isinstance(answer, dict) else None
        results: list[Any] = []
        if isinstance(found, dict):
            for section in ("web", "news"):
                if isinstance(found.get(section), list):
                    results += found[section]

        def snippet(result: dict[str, Any]) -> str:
            snippets = result.get("snippets")
            if isinstance(snippets, list) and snippets:
                return " … ".join(plain_text(s) for s in snippets)
            return plain_text(result.get("description"))

        return search_hits(results, topn, snippet, "page_age")


def make_search_api(backend: str) -> ExaBackend | BraveBackend | YouBackend:
    """The `backend` ("exa", "brave", "you") with its key from the environment; ValueError naming the variable
    when it is not set, for the server to refuse to start."""
    key = api_key(backend)
    if key is None:
        raise ValueError(
            f"--browser-backend {backend} needs its API key in the {API_KEYS[backend]} environment variable"
        )
    classes = {"exa": ExaBackend, "brave": BraveBackend, "you": YouBackend}
    return classes[backend](key)
