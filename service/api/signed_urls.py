"""HMAC-signed, expiring URLs of ``GET /v1/files/{key}``: the signature is the credential (no API key).

The signature covers the key and the expiry time, so a URL cannot be stretched in time or pointed
at another object (another job's image) without the server's secret.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import quote, urlencode


def signature(secret: bytes, key: str, expires: int) -> str:
    """Hex HMAC-SHA256 of ``key`` and ``expires`` (Unix seconds)."""
    return hmac.new(secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()


def signed_path(secret: bytes, key: str, ttl_seconds: int, now: float | None = None) -> str:
    """``/v1/files/<key>?expires=...&signature=...``, valid ``ttl_seconds`` from ``now``."""
    expires = int(now if now is not None else time.time()) + ttl_seconds
    query = urlencode({"expires": expires, "signature": signature(secret, key, expires)})
    return f"/v1/files/{quote(key)}?{query}"


def verify(secret: bytes, key: str, expires: str | None, given: str | None, now: float | None = None) -> str | None:
    """Why a signed URL is refused (tampered, expired, malformed), or ``None`` when it is good."""
    if not expires or not given or not expires.isdigit():
        return "the URL carries no valid expires and signature"
    if not hmac.compare_digest(signature(secret, key, int(expires)), given):
        return "the URL's signature does not match"
    if int(expires) < (now if now is not None else time.time()):
        return "the URL has expired"
    return None
