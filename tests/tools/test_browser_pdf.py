"""PDF pages in the browser: a PDF the test writes (by hand, the bytes of the format) is served on loopback,
fetched through the guarded fetcher and shown in the usual page view; broken, encrypted and over-long ones
end as the caps say."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import pytest
from pypdf import PdfWriter

from tests.tools.test_browser_fetch import allowing, loopback_server, reply
from tools.browser.backends import BrowserError
from tools.browser.browser import Browser
from tools.browser.fetch import SafeFetcher
from tools.browser.pdf import pdf_text


def make_pdf(pages: list[list[str]], title: str | None = None) -> bytes:
    """A PDF of `pages`, each a list of text lines in Helvetica: objects, cross-reference table and trailer
    written out, offsets counted."""
    objects: list[bytes] = []
    kids = []
    font = 3 + 2 * len(pages)
    for i, lines in enumerate(pages):
        page_id, content_id = 3 + 2 * i, 4 + 2 * i
        kids.append(f"{page_id} 0 R")
        text = " T* ".join(f"({line})Tj" for line in lines)
        stream = f"BT /F1 12 Tf 14 TL 72 720 Td {text} ET".encode()
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content_id} 0 R "
            f"/Resources << /Font << /F1 {font} 0 R >> >> >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects.insert(0, b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.insert(1, f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    info = None
    if title is not None:
        objects.append(f"<< /Title ({title}) >>".encode())
        info = len(objects)
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    trailer = f"<< /Size {len(objects) + 1} /Root 1 0 R" + (f" /Info {info} 0 R" if info else "") + " >>"
    out += f"trailer\n{trailer}\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


REPORT = make_pdf(
    [["Annual report 2026", "Revenue grew by 12 percent."], ["Outlook", "Costs fall next year."]],
    title="Annual Report",
)


def chars(text: str) -> int:
    return len(text)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_the_text_of_each_page_and_the_title() -> None:
    title, text = pdf_text(REPORT, time.monotonic() + 10)
    assert title == "Annual Report"
    assert text == (
        "[page 1]\nAnnual report 2026\nRevenue grew by 12 percent.\n\n[page 2]\nOutlook\nCosts fall next year."
    )


def test_an_opened_pdf_is_a_page_view_with_find() -> None:
    with loopback_server({"/report.pdf": reply(body=REPORT, content_type="application/pdf")}) as site:
        browser = Browser(backend=None, fetcher=SafeFetcher(allowing(site)), count_tokens=chars)  # type: ignore[arg-type]
        opened = run(browser.open(site.url("/report.pdf")))
        found = run(browser.find("costs"))
    assert opened.ok
    lines = opened.text.splitlines()
    assert lines[0] == f"[0] Annual Report ({site.url('/report.pdf')})"
    assert lines[1:] == [
        "**viewing lines [0 - 8] of 8**",
        "",
        "L0: ",
        f"L1: URL: {site.url('/report.pdf')}",
        "L2: [page 1]",
        "L3: Annual report 2026",
        "L4: Revenue grew by 12 percent.",
        "L5: ",
        "L6: [page 2]",
        "L7: Outlook",
        "L8: Costs fall next year.",
    ]
    assert found.ok
    assert "Costs fall next year." in found.text
    assert site.hits[0][1]["Accept"].count("application/pdf") == 1


def test_bad_encrypted_and_oversized_pdfs() -> None:
    writer = PdfWriter()
    writer.add_blank_page(width=100, height=100)
    writer.encrypt("secret")
    encrypted = io.BytesIO()
    writer.write(encrypted)
    with pytest.raises(BrowserError, match="encrypted"):
        pdf_text(encrypted.getvalue(), time.monotonic() + 10)
    with pytest.raises(BrowserError, match="could not be read"):
        pdf_text(b"%PDF-1.4\nnot really a pdf", time.monotonic() + 10)
    many = make_pdf([[f"page {i} " + "words " * 20] for i in range(6)])
    _, text = pdf_text(many, time.monotonic() + 10, max_chars=250)  # each page has 127 characters
    assert text.endswith("[reading stopped after page 2 of 6: too much text]")
    _, late = pdf_text(many, time.monotonic() - 1)
    assert late == "[reading stopped at page 1 of 6: out of time]"
    # Through the fetcher, a broken PDF is an error the model reads, not a server error.
    with loopback_server({"/x.pdf": reply(body=b"%PDF-1.4 broken", content_type="application/pdf")}) as site:
        browser = Browser(backend=None, fetcher=SafeFetcher(allowing(site)), count_tokens=chars)  # type: ignore[arg-type]
        failed = run(browser.open(site.url("/x.pdf")))
    assert not failed.ok
    assert failed.text == f"Error fetching URL `{site.url('/x.pdf')}`: the PDF could not be read"
