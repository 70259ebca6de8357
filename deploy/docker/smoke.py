#!/usr/bin/env python3
"""Smoke checks of a running fastcache container, from outside it (stdlib only, no curl needed).

Used by ``deploy/docker/build-local.sh``; each subcommand prints one line and exits non-zero on
failure::

    smoke.py ready URL [--timeout S]   poll GET URL/readyz until 200; prints the seconds it took
    smoke.py generate URL              POST URL/generate; checks 200 and a decodable PNG
    smoke.py metrics URL               GET URL/metrics; checks fastcache_ metric families
    smoke.py healthz URL               GET URL/healthz answers 200
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import sys
import time
import urllib.error
import urllib.request

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class SmokeError(Exception):
    """A check failed; the message says what was expected and what came back."""


def _get(url: str, timeout: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def wait_ready(base: str, timeout: float, interval: float = 0.5) -> float:
    """Seconds until ``GET /readyz`` answers 200; raises SmokeError after ``timeout`` seconds."""
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() - start < timeout:
        try:
            status, body = _get(f"{base}/readyz", timeout=5)
            if status == 200:
                return time.monotonic() - start
            last = f"{status} {body[:200]}"
        except OSError as error:  # not listening yet
            last = str(error)
        time.sleep(interval)
    raise SmokeError(f"{base}/readyz not ready after {timeout:.0f} s; last answer: {last}")


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, read from its IHDR chunk; SmokeError if ``data`` is no PNG."""
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise SmokeError(f"not a PNG image (starts with {data[:16]!r})")
    return struct.unpack(">II", data[16:24])


def generate(base: str, prompt: str = "7", steps: int = 10, timeout: float = 600) -> str:
    """One ``POST /generate``; returns a one-line description of the image it answered with."""
    body = json.dumps({"prompt": prompt, "steps": steps, "seed": 0}).encode()
    request = urllib.request.Request(
        f"{base}/generate", data=body, method="POST", headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:300]
        raise SmokeError(f"POST /generate answered {error.code}: {detail}") from error
    if status != 200:
        raise SmokeError(f"POST /generate answered {status}: {payload[:300]}")
    answer = json.loads(payload)
    images = answer.get("images") or []
    if len(images) != 1:
        raise SmokeError(f"POST /generate answered {len(images)} images, expected 1")
    data = base64.b64decode(images[0]["b64_json"])
    width, height = png_size(data)
    return f"200, one {width}x{height} PNG ({len(data)} bytes), model {answer.get('model')!r}"


def metric_families(exposition: str, prefix: str = "fastcache_") -> list[str]:
    """Names of the metric families a Prometheus text exposition declares with ``# TYPE``."""
    return sorted(
        name
        for name in (line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE "))
        if name.startswith(prefix) and not name.endswith("_created")
    )


def metrics(base: str, required: tuple[str, ...] = ("fastcache_ready",)) -> str:
    status, text = _get(f"{base}/metrics", timeout=30)
    if status != 200:
        raise SmokeError(f"GET /metrics answered {status}")
    families = metric_families(text)
    missing = [name for name in required if name not in families]
    if not families or missing:
        raise SmokeError(f"/metrics lacks {missing or 'any fastcache_ metric'}")
    return f"{len(families)} fastcache_ metric families ({', '.join(families[:4])}, ...)"


def healthz(base: str) -> str:
    status, body = _get(f"{base}/healthz", timeout=10)
    if status != 200:
        raise SmokeError(f"GET /healthz answered {status}: {body[:200]}")
    return "200"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=("ready", "generate", "metrics", "healthz"))
    parser.add_argument("url", help="base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--timeout", type=float, default=600, help="ready: seconds to wait at most")
    parser.add_argument("--steps", type=int, default=10, help="generate: denoising steps")
    args = parser.parse_args(argv)
    base = args.url.rstrip("/")
    try:
        if args.check == "ready":
            print(f"{wait_ready(base, args.timeout):.1f}")
        elif args.check == "generate":
            print(generate(base, steps=args.steps, timeout=args.timeout))
        elif args.check == "metrics":
            print(metrics(base))
        else:
            print(healthz(base))
    except SmokeError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
