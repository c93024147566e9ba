"""Web search through a SearXNG instance's JSON API: ``GET {base}/search?q=...&format=json``.

SearXNG is self-hosted and needs no key. Its base URL comes from the server's configuration, so it is trusted
(it is usually on loopback or a private network) and not put through the SSRF guard; the pages its results
point at are, when the browser opens them. The instance must allow JSON output (``search.formats: [html,
json]`` in its settings), or it answers 403.
"""

from __future__ import annotations

import json
import logging

import httpx

from tools.browser.backends import BrowserError, SearchHit, plain_text, search_hits

logger = logging.getLogger(__name__)

# A results page is some tens of KiB; anything far bigger is not a SearXNG answer.
MAX_RESPONSE_BYTES = 2 << 20


class SearxngBackend:
    def __init__(
        self,
        base_url: str,
        *,
        name: str = "web",
        timeout_s: float = 10.0,
        language: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = name
        self.timeout_s = timeout_s
        self.language = language
        self._transport = transport

    async def search(self, query: str, topn: int) -> list[SearchHit]:
        params = {"q": query, "format": "json"}
        if self.language:
            params["language"] = self.language
        # No proxies from the environment and no redirects: the configured instance answers, or nothing does.
        async with httpx.AsyncClient(
            timeout=self.timeout_s, trust_env=False, follow_redirects=False, transport=self._transport
        ) as client:
            try:
                async with client.stream("GET", f"{self.base_url}/search", params=params) as response:
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_RESPONSE_BYTES:
                            raise BrowserError("search failed: the search service's answer was too large")
            except httpx.HTTPError as exc:
                logger.warning("searxng %s: %s", self.base_url, exc)
                raise BrowserError("search failed: the search service could not be reached") from exc
        if response.status_code != 200:
            # 403 usually means the instance does not allow format=json: the log says so to the operator.
            logger.warning("searxng %s answered HTTP %d", self.base_url, response.status_code)
            raise BrowserError(f"search failed: the search service answered HTTP {response.status_code}")
        try:
            results = json.loads(body).get("results", [])
        except (ValueError, AttributeError) as exc:
            raise BrowserError("search failed: the search service's answer was not JSON") from exc
        return search_hits(results, topn, lambda result: plain_text(result.get("content")), "publishedDate")
