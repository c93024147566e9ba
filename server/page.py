"""The chat page at `/`: three static files shipped inside the package and served as they are (no build
step, nothing fetched from elsewhere, so it works offline).

The page carries no secret, so it loads without the API key; the API calls it makes send the key the user
typed into it. Its Content-Security-Policy lets it run only its own script and reach only this server: a
second guard behind the page's rule that model text enters the DOM as text, never as markup.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

# Path -> (file in `server/static`, media type).
PAGE_FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
PAGE_PATHS = frozenset(PAGE_FILES)

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def page_router() -> APIRouter:
    """The page's routes, kept out of the OpenAPI document (they are not part of the API)."""
    router = APIRouter(include_in_schema=False)
    static = resources.files("server") / "static"
    for path, (name, media_type) in PAGE_FILES.items():
        router.add_api_route(
            path, _file_route(static.joinpath(name).read_bytes(), media_type), methods=["GET", "HEAD"]
        )
    return router


def _file_route(body: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    headers = {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        # Fetched anew on each load (the files are small): an upgraded server's page never runs an old script.
        "Cache-Control": "no-cache",
    }

    async def serve() -> Response:
        return Response(body, media_type=media_type, headers=headers)

    return serve
