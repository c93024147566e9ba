"""The page's files over HTTP, the flag that turns them off, and CORS on every API route (no browser)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from server.app import create_app
from server.main import build, parse_args
from server.page import CONTENT_SECURITY_POLICY, PAGE_FILES, PAGE_PATHS
from server.routes import router
from server.settings import ServerSettings

KEY = "k3y"
ORIGIN = "https://chat.example"


def test_the_page_loads_without_the_key_and_the_api_still_needs_it() -> None:
    with TestClient(create_app(None, ServerSettings(api_key=KEY))) as client:
        for path, (_, media_type) in PAGE_FILES.items():
            response = client.get(path)
            assert response.status_code == 200, path
            assert response.headers["content-type"] == media_type
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert response.headers["x-content-type-options"] == "nosniff"
            head = client.head(path)  # what link checkers and `curl -I` send
            assert head.status_code == 200
            assert head.content == b""
        assert client.get("/v1/models").status_code == 401
        assert client.get("/static/other.js").status_code == 401  # only the page's own files are open
        # The page asks for exactly the files served, nothing from another host (it works offline).
        html = client.get("/").text
        assert set(re.findall(r'(?:src|href)="(/[^"]*)"', html)) == PAGE_PATHS - {"/"}
        assert "http" not in re.sub(r"<meta[^>]*>", "", html)
        # The page is not part of the API's document.
        document = client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert not set(document["paths"]) & PAGE_PATHS


def test_the_page_can_be_turned_off() -> None:
    with TestClient(create_app(None, ServerSettings(chat_page=False))) as client:
        for path in PAGE_PATHS:
            assert client.get(path).status_code == 404, path
        assert client.get("/v1/models").status_code == 200
    # Off, its paths are no longer open: with a key set they are refused like any other.
    with TestClient(create_app(None, ServerSettings(chat_page=False, api_key=KEY))) as client:
        assert client.get("/").status_code == 401


def test_the_flag_reaches_the_settings(tmp_path: Path) -> None:
    common = ["--cache-dir", str(tmp_path), "--device", "cpu", "--max-model-len", "64"]
    _, on = build(parse_args(common))
    _, off = build(parse_args([*common, "--chat-page", "off"]))
    assert (on.chat_page, off.chat_page) == (True, False)


def _api_routes() -> list[tuple[str, str]]:
    routes = []
    for route in router.routes:
        assert isinstance(route, APIRoute)
        path = route.path.replace("{response_id}", "resp_x")
        routes += [(method, path) for method in sorted(route.methods) if method != "HEAD"]
    return routes


@pytest.mark.parametrize("origins", [[ORIGIN], ["*"]])
def test_the_preflight_is_answered_on_every_api_route(origins: list[str]) -> None:
    """What a browser asks before a cross-origin call with a JSON body and a bearer token."""
    settings = ServerSettings(api_key=KEY, cors_origins=origins)
    with TestClient(create_app(None, settings)) as client:
        routes = _api_routes()
        assert {("POST", "/v1/responses"), ("DELETE", "/v1/responses/resp_x")} <= set(routes)
        for method, path in routes:
            response = client.options(
                path,
                headers={
                    "Origin": ORIGIN,
                    "Access-Control-Request-Method": method,
                    "Access-Control-Request-Headers": "authorization,content-type",
                },
            )
            assert response.status_code == 200, (method, path, response.text)
            assert response.headers["access-control-allow-origin"] in (ORIGIN, "*")
            assert method in response.headers["access-control-allow-methods"]
            allowed = response.headers["access-control-allow-headers"].lower().split(",")
            assert {"authorization", "content-type"} <= {h.strip() for h in allowed}, allowed
        # Another origin gets no grant.
        if origins != ["*"]:
            other = client.options(
                "/v1/models",
                headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
            )
            assert "access-control-allow-origin" not in other.headers


def test_without_cors_origins_no_route_grants_any_origin() -> None:
    with TestClient(create_app(None, ServerSettings())) as client:
        for method, path in _api_routes():
            response = client.options(
                path,
                headers={
                    "Origin": ORIGIN,
                    "Access-Control-Request-Method": method,
                    "Access-Control-Request-Headers": "authorization,content-type",
                },
            )
            assert "access-control-allow-origin" not in response.headers, (method, path)
        assert (
            "access-control-allow-origin" not in client.get("/v1/models", headers={"Origin": ORIGIN}).headers
        )


def test_refusals_before_any_route_carry_the_cors_headers() -> None:
    """A 401 (wrong key) or 413 (body too large) is readable by the page on the allowed origin."""
    settings = ServerSettings(api_key=KEY, cors_origins=[ORIGIN], max_request_bytes=64)
    with TestClient(create_app(None, settings)) as client:
        refused = client.get("/v1/models", headers={"Origin": ORIGIN, "Authorization": "Bearer wrong"})
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in refused.headers["access-control-expose-headers"].lower()
        large = client.post(
            "/tokenize",
            json={"prompt": "x" * 100},
            headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"},
        )
        assert large.status_code == 413
        assert large.headers["access-control-allow-origin"] == ORIGIN
