"""Pages as the model was trained to read them: HTML to text with link ids, 80-column numbered lines, windows.

The gpt-oss reference renders every page the same way, and the model learnt to read exactly that: links become
``【{id}†{text}】`` (``【{id}†{text}†{domain}】`` when the link leaves the page's domain), images become
``[Image n: alt]``, the text is wrapped at 80 columns and each line is numbered ``L{n}: ``; a view shows the
lines that fit in about 1024 tokens under a two-line header. Page text itself can never carry a real marker:
``【`` and ``】`` in the source become ``〖`` and ``〗`` before any marker is made, so a page cannot forge a
link id or a citation.

HTML goes through lxml (a fast, lenient parser that survives the broken markup of real pages, and lets links
be rewritten in the tree before conversion) and then html2text (the converter the model's pages came from:
headings as ``#``, list items as ``  * ``, the layout the model saw).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from urllib.parse import urljoin, urlsplit

import html2text
import lxml.etree
import lxml.html

# What the model saw: 80 columns, and a view of about this many tokens when `num_lines` is not given.
WRAP_COLUMNS = 80
VIEW_TOKENS = 1024
# Extracted text beyond this is cut before wrapping: a page larger than this is not read whole by a model with
# a ~1k-token viewport anyway, and wrapping and numbering it would cost time and memory for nothing.
MAX_TEXT_CHARS = 2_000_000

TokenCounter = Callable[[str], int]

# Characters outside the Basic Multilingual Plane (emoji, mostly) are removed, as in the reference: the model
# never saw them in page views, and each costs several tokens.
_SMP = re.compile("[\U00010000-\U0010ffff]")
_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_BLANK_RUNS = re.compile(r"\n{3,}")
_SPACE_RUNS = re.compile(r"\s+")
# A link marker as this module writes it; group 1 is the link text.
LINK_MARKER = re.compile(r"【\d+†([^†】]*)(?:†[^】]*)?】")

# Never rendered: code and styling, and MathML, which the reference drops (its markup is noise as text).
_DROPPED_TAGS = ("script", "style", "noscript", "template", "math", "svg", "iframe", "object", "embed")


class PageKind(Enum):
    PAGE = "page"  # fetched or local content
    SEARCH = "search"  # a search-results page made from backend hits
    FIND = "find"  # `find` results over another page


@dataclass(slots=True)
class PageContents:
    """A page ready to view: its wrapped lines and the links its markers point at."""

    url: str  # "" for search pages, as in the reference (their header shows no URL)
    title: str
    lines: list[str]
    links: dict[int, str] = field(default_factory=dict)  # link id -> absolute URL
    kind: PageKind = PageKind.PAGE
    # For FIND pages: the page searched, the line each link id jumps to, and the searched page's line under
    # each find-page line (None for the `# 【n†match at Lk】` headings), so a citation of the find page can be
    # mapped back to the page it quotes.
    source: PageContents | None = None
    link_lines: dict[int, int] = field(default_factory=dict)
    line_origin: list[int | None] | None = None


def neutralise(text: str) -> str:
    """Source text made safe to carry markers: no forged `【…】`, no zero-width characters, no astral ones."""
    text = _SMP.sub("", text)
    text = _ZERO_WIDTH.sub("", text)
    return text.replace("【", "〖").replace("】", "〗")


def wrap_lines(text: str, width: int = WRAP_COLUMNS) -> list[str]:
    """Wrap each line of `text` at `width` columns, keeping whitespace as the reference does (a continuation
    can start with the space it was split at); empty lines stay as empty lines."""
    out: list[str] = []
    for line in text.split("\n"):
        if not line:
            out.append("")
            continue
        out.extend(textwrap.wrap(line, width=width, replace_whitespace=False, drop_whitespace=False) or [""])
    return out


def _domain(url: str) -> str:
    return urlsplit(url).hostname or ""


def _replace_with_text(element: lxml.html.HtmlElement, text: str) -> None:
    """Put `text` where `element` was (keeping the text that followed it) and remove the element."""
    text += element.tail or ""
    previous = element.getprevious()
    parent = element.getparent()
    if parent is None:
        return
    if previous is not None:
        previous.tail = (previous.tail or "") + text
    else:
        parent.text = (parent.text or "") + text
    parent.remove(element)


def _converter() -> html2text.HTML2Text:
    converter = html2text.HTML2Text()
    # Links and images are already markers in the text; tables, emphasis and wrapping as the reference had
    # them (tables as plain cell text, no `*` emphasis, no wrapping here: lines are wrapped at 80 afterwards).
    converter.ignore_links = True
    converter.ignore_images = True
    converter.ignore_tables = True
    converter.ignore_emphasis = True
    converter.body_width = 0
    converter.unicode_snob = True
    return converter


def _page_text(url: str, body: str) -> str:
    """The reference puts the URL at the top of every page's text, after an empty line."""
    body = _BLANK_RUNS.sub("\n\n", body).strip()
    if len(body) > MAX_TEXT_CHARS:
        body = body[:MAX_TEXT_CHARS] + "\n\n[page text cut: too long]"
    return f"\nURL: {url}\n{body}"


def html_to_page(
    html: str, url: str, title: str | None = None, kind: PageKind = PageKind.PAGE
) -> PageContents:
    """Turn an HTML document at `url` into a page: links become numbered markers, the rest becomes text.

    Link ids are numbered per page in order of first appearance, one id per distinct target URL. Links to
    fragments of the page itself stay as plain text, and so do links to anything but http(s) (mailto:,
    javascript:, data:): the model can only open web pages. `title` overrides the document's own title.
    """
    html = neutralise(html)
    if title is not None:  # a search query, say: the model's text, shown in a header all the same
        title = neutralise(title)
    links: dict[int, str] = {}
    ids: dict[str, int] = {}
    page_domain = _domain(url)
    try:
        doc = lxml.html.document_fromstring(html)
    except (lxml.etree.ParserError, ValueError):
        # Empty or whitespace-only documents: lxml has nothing to parse, and there is no text to show.
        doc = None
    if doc is None:
        return PageContents(url=url, title=title or url, lines=wrap_lines(_page_text(url, "")), kind=kind)

    if title is None:
        found = doc.findtext(".//title")
        title = _SPACE_RUNS.sub(" ", found).strip() if found else ""
        if not title:
            heading = doc.find(".//h1")
            title = _SPACE_RUNS.sub(" ", heading.text_content()).strip() if heading is not None else ""
    lxml.etree.strip_elements(doc, *_DROPPED_TAGS, "title", with_tail=False)

    # With tables ignored html2text runs a row's cells together ("ab" for a|b): keep a space between them.
    for cell in doc.iter("td", "th"):
        cell.tail = " " + (cell.tail or "")

    for image_number, image in enumerate(list(doc.iter("img"))):
        alt = _SPACE_RUNS.sub(" ", image.get("alt") or "").strip()
        _replace_with_text(image, f"[Image {image_number}: {alt}]" if alt else f"[Image {image_number}]")

    for anchor in list(doc.iter("a")):
        text = _SPACE_RUNS.sub(" ", anchor.text_content()).strip()
        href = (anchor.get("href") or "").strip()
        target = urljoin(url, href) if href else ""
        parts = urlsplit(target)
        if href.startswith("#") or parts.scheme not in ("http", "https") or not parts.hostname:
            _replace_with_text(anchor, text)
            continue
        target = parts._replace(fragment="").geturl()
        link_id = ids.setdefault(target, len(ids))
        links[link_id] = target
        domain = parts.hostname
        # `†` separates the marker's fields; inside link text it would split them wrongly.
        text = text.replace("†", "+")
        marker = f"【{link_id}†{text}】" if domain == page_domain else f"【{link_id}†{text}†{domain}】"
        _replace_with_text(anchor, marker)

    body = _converter().handle(lxml.html.tostring(doc, encoding="unicode"))
    return PageContents(
        url=url, title=title or url, lines=wrap_lines(_page_text(url, body)), links=links, kind=kind
    )


def text_to_page(text: str, url: str, title: str | None = None) -> PageContents:
    """A plain-text (or Markdown, or JSON) page: shown as it is, with no links."""
    text = neutralise(text)
    if title is None:
        title = _markdown_title(text) or urlsplit(url).path.rsplit("/", 1)[-1] or url
    return PageContents(url=url, title=title, lines=wrap_lines(_page_text(url, text)))


def _markdown_title(text: str) -> str:
    for line in text.splitlines()[:50]:
        if line.startswith("# "):
            return line[2:].strip()
    return ""


def view_end(lines: list[str], loc: int, num_lines: int, count_tokens: TokenCounter, view_tokens: int) -> int:
    """One past the last line shown from `loc`: `num_lines` lines when given (> 0), otherwise as many numbered
    lines as fit in `view_tokens` tokens, and always at least one."""
    total = len(lines)
    if num_lines > 0:
        return min(loc + num_lines, total)
    used = 0
    end = loc
    while end < total:
        used += count_tokens(f"L{end}: {lines[end]}\n")
        if used > view_tokens and end > loc:
            break
        end += 1
    return end


def render_view(page: PageContents, cursor: int, loc: int, end: int) -> str:
    """The text the model sees for lines [loc, end) of `page` shown under `cursor`."""
    header = f"[{cursor}] {page.title}" + (f" ({page.url})" if page.url else "")
    body = "\n".join(f"L{i}: {page.lines[i]}" for i in range(loc, end))
    return f"{header}\n**viewing lines [{loc} - {end - 1}] of {len(page.lines) - 1}**\n\n{body}"
