"""``GET /``: the browser playground, one static page shipped inside the package (no build, no CDN).

The page itself needs no API key: it holds no data and asks for the key when the API answers 401.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["playground"])

PAGE = "playground.html"


@lru_cache(maxsize=1)
def playground_html() -> str:
    """The page's text, read once from the installed package (``service/api/static``)."""
    return resources.files("service.api").joinpath("static").joinpath(PAGE).read_text(encoding="utf-8")


@router.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    # the page talks only to this origin; a strict policy keeps it that way (no inline event handlers needed)
    return HTMLResponse(
        playground_html(),
        headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
            "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; connect-src 'self'; "
            "frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
        },
    )
