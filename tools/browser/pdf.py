"""PDF documents as browser pages: their text, page by page, read with pypdf (pure Python, no system library).

A PDF the browser opens was chosen by the model from the open web, so it is read as hostile: the body is
already capped in size by the fetcher, the reading runs on a worker thread (never the event loop) and stops at
a deadline and at the page view's text cap, between pages; a file pypdf cannot read is a plain error for the
model. Each page's text is preceded by a `[page N]` line, so the model can say where something was.
"""

from __future__ import annotations

import io
import logging
import time

from pypdf import PdfReader
from pypdf.errors import PyPdfError

from tools.browser.backends import BrowserError
from tools.browser.page import MAX_TEXT_CHARS

logger = logging.getLogger(__name__)

PDF_TYPE = "application/pdf"


def pdf_text(data: bytes, deadline: float, max_chars: int = MAX_TEXT_CHARS) -> tuple[str | None, str]:
    """The document's title (from its metadata, if any) and its text; reading stops, saying so, at
    `deadline` (a `time.monotonic()` value) or past `max_chars`. BrowserError if it is no readable PDF."""
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise BrowserError("the PDF is encrypted")
        metadata = reader.metadata
        title = metadata.title if metadata is not None else None
        parts: list[str] = []
        size = 0
        pages = len(reader.pages)
        for number, page in enumerate(reader.pages, start=1):
            if time.monotonic() > deadline:
                parts.append(f"[reading stopped at page {number} of {pages}: out of time]")
                break
            text = page.extract_text() or ""
            parts.append(f"[page {number}]\n{text.strip()}")
            size += len(text)
            if size > max_chars and number < pages:
                parts.append(f"[reading stopped after page {number} of {pages}: too much text]")
                break
    except BrowserError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        # pypdf raises its own errors for most broken files, and plain ones for some malformed structures.
        logger.info("pdf could not be read: %r", exc)
        raise BrowserError("the PDF could not be read") from exc
    return (title.strip() or None) if isinstance(title, str) else None, "\n\n".join(parts)
