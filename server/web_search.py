"""OpenAI's web search options, read and checked: the Responses `web_search` tool's `filters`, `user_location`
and `search_context_size`, and Chat Completions' `web_search_options`, into the browser's `SearchOptions`.

Each option does something here (see `tools.browser.browser.SearchOptions`): allowed domains filter the
search results and every page opened (links followed and redirects included); the context size sets how many
results a search shows and how long a page's view is; the location goes to the backends that localize results
(`uses_location`), the others search without it. A value this server cannot honour is a 400 naming the field,
never dropped quietly.
"""

from __future__ import annotations

import re
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from server.errors import bad_request
from tools.browser.backends import UserLocation
from tools.browser.browser import CONTEXT_SIZES, SearchOptions

# As OpenAI documents: up to 100 allowed domains.
MAX_ALLOWED_DOMAINS = 100
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_COUNTRY = re.compile(r"^[A-Za-z]{2}$")
_LOCATION_TEXT_LIMIT = 200
_TOOL_FIELDS = frozenset({"type", "filters", "user_location", "search_context_size", "external_web_access"})


def responses_options(tool: dict[str, Any], where: str, *, offline: bool) -> SearchOptions:
    """The options of a Responses `web_search` tool (`tool` its fields but `type`), `where` its place in the
    request (`tools[0]`). `offline`: the backend never reaches the web (a local corpus), so
    `external_web_access: false` is what it does anyway."""
    for key in tool:
        if key not in _TOOL_FIELDS:
            raise bad_request(f"web_search tools have no field {key!r}", param=f"{where}.{key}")
    access = tool.get("external_web_access")
    if access is not None and not isinstance(access, bool):
        raise bad_request("external_web_access must be a boolean", param=f"{where}.external_web_access")
    if access is False and not offline:
        raise bad_request(
            "external_web_access false (cache-only search) is not supported by this server's browser backend",
            param=f"{where}.external_web_access",
        )
    filters = tool.get("filters")
    domains: tuple[str, ...] = ()
    if filters is not None:
        if not isinstance(filters, dict):
            raise bad_request("filters must be an object", param=f"{where}.filters")
        for key in filters:
            if key != "allowed_domains":
                raise bad_request(f"filters have no field {key!r}", param=f"{where}.filters.{key}")
        domains = allowed_domains(filters.get("allowed_domains"), f"{where}.filters.allowed_domains")
    location = tool.get("user_location")
    return SearchOptions(
        allowed_domains=domains,
        location=None if location is None else _location(location, location, f"{where}.user_location"),
        context_size=_context_size(tool.get("search_context_size"), f"{where}.search_context_size"),
    )


def chat_options(options: Any) -> SearchOptions:
    """Chat Completions' `web_search_options`: `search_context_size` and `user_location` (its fields nested
    under `approximate`, as chat has them)."""
    where = "web_search_options"
    if not isinstance(options, dict):
        raise bad_request("web_search_options must be an object", param=where)
    for key in options:
        if key not in ("search_context_size", "user_location"):
            raise bad_request(f"web_search_options have no field {key!r}", param=f"{where}.{key}")
    location = options.get("user_location")
    parsed = None
    if location is not None:
        if not isinstance(location, dict):
            raise bad_request("user_location must be an object", param=f"{where}.user_location")
        for key in location:
            if key not in ("type", "approximate"):
                raise bad_request(f"user_location has no field {key!r}", param=f"{where}.user_location.{key}")
        parsed = _location(location, location.get("approximate") or {}, f"{where}.user_location")
    return SearchOptions(
        location=parsed,
        context_size=_context_size(options.get("search_context_size"), f"{where}.search_context_size"),
    )


def allowed_domains(value: Any, where: str) -> tuple[str, ...]:
    """Domains as OpenAI takes them (`example.com`; a scheme or a trailing slash is tolerated), lower case."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise bad_request("allowed_domains must be a list of domain names", param=where)
    if len(value) > MAX_ALLOWED_DOMAINS:
        raise bad_request(f"at most {MAX_ALLOWED_DOMAINS} allowed domains, got {len(value)}", param=where)
    out: list[str] = []
    for i, raw in enumerate(value):
        domain = raw.strip().lower() if isinstance(raw, str) else ""
        domain = re.sub(r"^https?://", "", domain).rstrip("/").rstrip(".")
        if not _DOMAIN.match(domain):
            raise bad_request(f"{raw!r} is not a domain name (such as 'example.com')", param=f"{where}[{i}]")
        out.append(domain)
    return tuple(dict.fromkeys(out))


def _context_size(value: Any, where: str) -> Any:
    if value is None:
        return "medium"
    if value not in CONTEXT_SIZES:
        raise bad_request("search_context_size must be 'low', 'medium' or 'high'", param=where)
    return value


def _location(location: Any, fields: Any, where: str) -> UserLocation:
    """`location` is the object with `type`; `fields` holds city, country, region and timezone (the same
    object in Responses, its `approximate` in chat)."""
    if not isinstance(location, dict):
        raise bad_request("user_location must be an object", param=where)
    if location.get("type", "approximate") != "approximate":
        raise bad_request("user_location's type must be 'approximate'", param=f"{where}.type")
    inner = where if fields is location else f"{where}.approximate"
    if not isinstance(fields, dict):
        raise bad_request("the approximate location must be an object", param=inner)
    known = ("city", "country", "region", "timezone")
    for key, value in fields.items():
        if fields is location and key == "type":
            continue
        if key not in known:
            raise bad_request(f"user_location has no field {key!r}", param=f"{inner}.{key}")
        if value is not None and (not isinstance(value, str) or len(value) > _LOCATION_TEXT_LIMIT):
            raise bad_request(
                f"{key} must be a string of at most {_LOCATION_TEXT_LIMIT} characters", param=f"{inner}.{key}"
            )
    country = fields.get("country")
    if country is not None and not _COUNTRY.match(country):
        raise bad_request(
            "country must be a two-letter ISO 3166-1 code, such as 'GB'", param=f"{inner}.country"
        )
    timezone = fields.get("timezone")
    if timezone is not None:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise bad_request(
                f"{timezone!r} is not an IANA time zone (such as 'Europe/London')", param=f"{inner}.timezone"
            ) from error
    return UserLocation(
        country=country.upper() if country else None,
        region=fields.get("region") or None,
        city=fields.get("city") or None,
        timezone=timezone or None,
    )
