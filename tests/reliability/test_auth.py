"""The auth matrix: with an API key set, every route of the app (as the app lists them) refuses a request
without the key or with a wrong one (401 in the OpenAI envelope), except /health, the chat page's files
(they carry no secret), and /metrics which the settings document as open; the scheme is case-insensitive (RFC 9110: `bearer KEY` is the same credential)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import httpx
from starlette.routing import BaseRoute

from server.page import PAGE_PATHS
from tests.reliability.conftest import serve
from tests.reliability.corpus import BASE

KEY = "sk-reliability-0123456789"
PUBLIC = {"/health", *PAGE_PATHS}
MAY_BE_PUBLIC = {"/metrics"}  # ServerSettings.api_key: "/health and /metrics stay open"

CREDENTIALS = {
    "none": None,
    "wrong key": f"Bearer {KEY}x",
    "wrong scheme": f"Basic {KEY}",
    "the key bare": KEY,
    "right": f"Bearer {KEY}",
    "bearer (lower case)": f"bearer {KEY}",
    "BEARER (upper case)": f"BEARER {KEY}",
}
ACCEPTED = {"right", "bearer (lower case)", "BEARER (upper case)"}


def _routes(routes: list[BaseRoute]) -> set[tuple[str, str]]:
    """(method, path) of every route, descending into included routers."""
    found: set[tuple[str, str]] = set()
    for route in routes:
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if isinstance(path, str):
            found |= {(m, path) for m in (methods or {"GET"}) - {"HEAD", "OPTIONS"}}
        inner = getattr(getattr(route, "original_router", None), "routes", None) or getattr(
            route, "routes", None
        )
        if inner:
            found |= _routes(list(inner))
    return found


def _documented(document: dict) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, ops in document.get("paths", {}).items() for m in ops}


def _is_401_envelope(response: httpx.Response) -> bool:
    if response.status_code != 401:
        return False
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str) and "type" in error


def test_every_route_needs_the_key(checkpoint: Path, summary: Callable[[str], None]) -> None:
    wrong: list[str] = []
    with serve(checkpoint, settings={"api_key": KEY}) as served:
        routes = sorted(_routes(served.app.routes) | _documented(served.app.openapi()))
        assert len(routes) >= 10, f"only {len(routes)} routes found: {routes}"
        with httpx.Client(base_url=served.base_url, timeout=30) as client:
            for method, path in routes:
                url = re.sub(r"\{[^}]+\}", "resp_unknown", path)
                body = BASE.get(path)
                if body is not None and "max_tokens" in body:
                    body = {**body, "max_tokens": 1}
                for label, header in CREDENTIALS.items():
                    headers = {} if header is None else {"authorization": header}
                    response = client.request(method, url, json=body, headers=headers)
                    refused = _is_401_envelope(response)
                    if path in PUBLIC or (path in MAY_BE_PUBLIC and label not in ACCEPTED):
                        ok = response.status_code < 400 or (path in MAY_BE_PUBLIC and refused)
                    elif label in ACCEPTED:
                        ok = response.status_code != 401 and response.status_code < 500
                    else:
                        ok = refused
                    if not ok:
                        wrong.append(
                            f"{method} {path} with {label}: {response.status_code} {response.text[:80]!r}"
                        )
    cells = len(routes) * len(CREDENTIALS)
    open_without_key = sorted({w.split(" with ")[0] for w in wrong if " with none:" in w})
    summary(
        f"{len(routes)} routes x {len(CREDENTIALS)} credentials: {cells - len(wrong)}/{cells} answered as they "
        f"should; open without the key: {open_without_key or 'none'}; "
        f"lower/upper-case scheme refused in {sum('case)' in w for w in wrong)} cells"
    )
    listing = "\n".join(wrong[:60])
    assert not wrong, f"{len(wrong)} of {cells} route/credential pairs answered wrongly:\n{listing}"
