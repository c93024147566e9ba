"""A local corpus: a directory of .html, .md and .txt files, searched and opened without any network.

The offline default and the backend the tests use. Files are read once, at start, into an in-memory SQLite
FTS5 index (Python's own sqlite3 carries FTS5): BM25 ranking, Porter stemming ("borrowing" finds "borrow") and
snippets come with the standard library, which is plenty for the corpora this is for (documentation sets,
intranet pages); a large corpus belongs behind a real search service such as SearXNG.

Documents get pseudo-URLs ``https://corpus.local/<relpath>``: the page pipeline needs a host for link domains
and citations, and relative links between corpus pages resolve to other corpus pages, which open here too.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import threading
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from tools.browser.backends import BrowserError, FetchedPage, SearchHit
from tools.browser.page import LINK_MARKER, html_to_page, text_to_page

logger = logging.getLogger(__name__)

HOST = "corpus.local"
_TYPES = {".html": "text/html", ".htm": "text/html", ".md": "text/markdown", ".txt": "text/plain"}
# Files larger than the fetcher would accept from the web are skipped, for the same reasons.
MAX_FILE_BYTES = 5 << 20
_WORDS = re.compile(r"\w+")


def corpus_url(relpath: str) -> str:
    return f"https://{HOST}/{quote(relpath)}"


class LocalCorpus:
    """Both a SearchBackend and a PageFetcher over the files under `root`."""

    name = "local"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self._docs: dict[str, tuple[str, str]] = {}  # relpath -> (content type, text)
        # One connection, used from worker threads one at a time, so searches never block the event loop.
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute(
            "CREATE VIRTUAL TABLE docs USING fts5(path UNINDEXED, title, body, tokenize='porter unicode61')"
        )
        for path in sorted(self.root.rglob("*")):
            self._add(path)
        self._db.commit()
        logger.info("local corpus %s: %d documents indexed", self.root, len(self._docs))

    def _add(self, path: Path) -> None:
        content_type = _TYPES.get(path.suffix.lower())
        if content_type is None or not path.is_file():
            return
        # A symlink out of the corpus would let the model read any file the server can: only real files
        # inside the root are served.
        if path.is_symlink() or not path.resolve().is_relative_to(self.root):
            logger.warning("local corpus: skipping %s, which leaves the corpus directory", path)
            return
        if path.stat().st_size > MAX_FILE_BYTES:
            logger.warning("local corpus: skipping %s, larger than %d bytes", path, MAX_FILE_BYTES)
            return
        relpath = path.relative_to(self.root).as_posix()
        text = path.read_bytes().decode("utf-8", errors="replace")
        self._docs[relpath] = (content_type, text)
        url = corpus_url(relpath)
        page = html_to_page(text, url) if content_type == "text/html" else text_to_page(text, url)
        # Index what the model will read, with link markers reduced to their text.
        body = LINK_MARKER.sub(r"\1", "\n".join(page.lines[2:]))
        self._db.execute("INSERT INTO docs (path, title, body) VALUES (?, ?, ?)", (relpath, page.title, body))

    def __len__(self) -> int:
        return len(self._docs)

    async def search(self, query: str, topn: int) -> list[SearchHit]:
        # The query's words, each quoted (so FTS5 syntax in a query is just text) and OR-ed: BM25 ranks the
        # documents with more, rarer words first, where AND would return nothing for one unmatched word.
        words = _WORDS.findall(query.lower())
        if not words or topn <= 0:
            return []
        match = " OR ".join('"' + word.replace('"', '""') + '"' for word in words)
        rows = await asyncio.to_thread(self._query, match, topn)
        return [SearchHit(url=corpus_url(path), title=title, snippet=text) for path, title, text in rows]

    def _query(self, match: str, topn: int) -> list[tuple[str, str, str]]:
        with self._lock:
            return self._db.execute(
                # Title matches weigh five times body matches; the path column is not searched.
                "SELECT path, title, snippet(docs, 2, '', '', ' … ', 24) FROM docs WHERE docs MATCH ? "
                "ORDER BY bm25(docs, 0.0, 5.0, 1.0) LIMIT ?",
                (match, topn),
            ).fetchall()

    async def fetch(self, url: str) -> FetchedPage:
        parts = urlsplit(url)
        relpath = unquote(parts.path.lstrip("/"))
        # Only what was indexed can be read: the path is a key into the index, never joined to the root.
        doc = self._docs.get(relpath) if parts.scheme == "https" and parts.hostname == HOST else None
        if doc is None:
            raise BrowserError(f"404 for {url}")
        content_type, text = doc
        return FetchedPage(url=corpus_url(relpath), content_type=content_type, text=text)
