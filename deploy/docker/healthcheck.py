#!/usr/bin/env python3
"""Container health check of the fastcache image (Dockerfile HEALTHCHECK; no curl in the image).

Exits 0 when the process in this container answers ``GET /healthz`` with 200, else 1. The API
(``fastcache-serve``) listens on FASTCACHE_PORT (8000), the worker (``fastcache-worker``) serves
/healthz on FASTCACHE_METRICS_PORT (9100); the check tries both, or only FASTCACHE_HEALTHCHECK_PORT
when that is set. Liveness only: readiness (model loaded and warmed) is ``/readyz``.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def candidate_ports(env: dict[str, str]) -> list[str]:
    if env.get("FASTCACHE_HEALTHCHECK_PORT"):
        return [env["FASTCACHE_HEALTHCHECK_PORT"]]
    ports = [env.get("FASTCACHE_PORT") or "8000", env.get("FASTCACHE_METRICS_PORT") or "9100"]
    return list(dict.fromkeys(ports))


def healthy(port: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{int(port)}/healthz", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError, urllib.error.URLError):
        return False


def main() -> int:
    timeout = float(os.environ.get("FASTCACHE_HEALTHCHECK_TIMEOUT", "4"))
    for port in candidate_ports(dict(os.environ)):
        if healthy(port, timeout):
            return 0
    print(f"no /healthz answered on 127.0.0.1 port(s) {', '.join(candidate_ports(dict(os.environ)))}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
