"""``fastcache-generate``: generate images from the shell against a running server.

Submits a job (``POST /v1/jobs``), shows a progress bar fed by the job's server-sent events,
writes the images into the output directory and prints what each cost. A full queue (429) or a
server that is not ready (503) is retried a bounded number of times, waiting as ``Retry-After``
says. Exit status: 0 done, 1 the job failed or the server could not be reached, 2 the server
rejected the request (4xx), 3 the server stayed busy through every retry, 130 interrupted (the job
is cancelled).

This module imports only the HTTP client, the progress bar and the cache-method registry (no torch, no
service internals) so the command starts at once.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import email.utils
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx
from tqdm import tqdm

from fastcache_core.config import CACHE_FIELDS
from fastcache_core.methods import get_method, method_names

DEFAULT_SERVER = "http://127.0.0.1:8000"
EXIT_FAILED, EXIT_REJECTED, EXIT_BUSY, EXIT_INTERRUPTED = 1, 2, 3, 130
MAX_RETRY_WAIT_SECONDS = 60.0  # a Retry-After longer than this is capped: the user is waiting at a terminal
RETRY_STATUSES = (429, 503)


class CommandError(Exception):
    """A failure to report on stderr and exit with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastcache-generate",
        description="Generate images with a running fastcache-serve server and save them.",
        epilog='Example: fastcache-generate "seven" -n 4 --tolerance 0.2 --seed 1 -o out/. '
        "Omitted options take the served model's defaults.",
    )
    parser.add_argument("prompt", help='text, or for a class-conditional model a label name or id ("seven", "7")')
    parser.add_argument("-n", type=int, default=1, help="images to generate (image i uses seed + i) (1)")
    parser.add_argument("-o", "--output", type=Path, default=Path("."), help="directory to write the images into (.)")
    parser.add_argument(
        "--server",
        default=os.environ.get("FASTCACHE_SERVER", DEFAULT_SERVER),
        help=f"base URL of the server (env FASTCACHE_SERVER; {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("FASTCACHE_API_KEY") or None,
        help="bearer key when the server has --api-key (env FASTCACHE_API_KEY)",
    )
    request = parser.add_argument_group("request (omitted: the model's defaults)")
    request.add_argument("--steps", type=int, help="denoising steps")
    request.add_argument(
        "--guidance", "--guidance-scale", dest="guidance_scale", type=float, help="classifier-free guidance scale"
    )
    request.add_argument("--seed", type=int, help="seed of the first image (random if omitted)")
    request.add_argument("--negative-prompt", help="what to steer away from (text models with negative prompts)")
    request.add_argument("--width", type=int, help="pixels")
    request.add_argument("--height", type=int, help="pixels")
    request.add_argument(
        "--format", dest="output_format", choices=("png", "jpeg", "webp"), default="png", help="image format (png)"
    )
    request.add_argument(
        "--timeout",
        dest="timeout_seconds",
        type=float,
        help="server-side deadline in seconds; past it the job fails with 504",
    )
    cache = parser.add_argument_group("cache (omitted: the model's calibrated defaults)")
    cache.add_argument("--method", choices=method_names(), help=_methods_help())
    for name, limits in CACHE_FIELDS.items():
        readers = ", ".join(m for m in method_names() if name in get_method(m).request_fields)
        bounds = f"{'(' if limits.low_open else '['}{limits.low:g}, {limits.high:g}]"
        kind = int if limits.integer else float
        cache.add_argument(
            f"--{name.replace('_', '-')}", type=kind, help=f"{bounds} {limits.summary} (read by: {readers})"
        )
    client = parser.add_argument_group("client")
    client.add_argument(
        "--retries",
        type=int,
        default=5,
        help="times to retry a 429 (queue full) or 503 (not ready), waiting Retry-After (5)",
    )
    client.add_argument("--json", action="store_true", help="print the full per-image stats as JSON lines")
    client.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


CACHE_OPTIONS = ("method", *CACHE_FIELDS)


def _methods_help() -> str:
    return "cache method: " + "; ".join(f"{name}: {get_method(name).summary}" for name in method_names())


REQUEST_OPTIONS = ("steps", "guidance_scale", "seed", "negative_prompt", "width", "height", "timeout_seconds")


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """The ``POST /v1/jobs`` body: only what the user gave, so the server fills in the model's defaults."""
    body: dict[str, Any] = {"prompt": args.prompt, "n": args.n, "output_format": args.output_format}
    body.update({name: getattr(args, name) for name in REQUEST_OPTIONS if getattr(args, name) is not None})
    cache = {name: getattr(args, name) for name in CACHE_OPTIONS if getattr(args, name) is not None}
    if cache:
        body["cache"] = cache
    return body


# --------------------------------------------------------------------------- talking to the server


def error_message(response: httpx.Response) -> str:
    """A readable line from a problem+json (or OpenAI, or plain) error response."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()[:200]
        return f"HTTP {response.status_code}" + (f": {text}" if text else "")
    if isinstance(body, dict) and isinstance(body.get("error"), dict):  # the OpenAI error object
        body = {"detail": body["error"].get("message"), "code": body["error"].get("code")}
    detail = body.get("detail") if isinstance(body, dict) else None
    code = body.get("code") if isinstance(body, dict) else None
    return f"HTTP {response.status_code} {code or ''}".rstrip() + f": {detail or response.reason_phrase}"


def retry_after_seconds(response: httpx.Response, default: float = 2.0) -> float:
    """Seconds to wait from ``Retry-After`` (delta-seconds or an HTTP date), capped."""
    value = response.headers.get("retry-after", "").strip()
    seconds = default
    if value.isdigit():
        seconds = float(value)
    elif value:
        with contextlib.suppress(TypeError, ValueError):
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_WAIT_SECONDS)


def submit(client: httpx.Client, body: dict[str, Any], retries: int, log: TextIO) -> dict[str, Any]:
    """``POST /v1/jobs``, retrying 429/503 up to ``retries`` times as ``Retry-After`` says."""
    for attempt in range(retries + 1):
        response = client.post("/v1/jobs", json=body)
        if response.status_code == 202:
            job: dict[str, Any] = response.json()
            return job
        message = error_message(response)
        if response.status_code in RETRY_STATUSES:
            if attempt == retries:
                raise CommandError(f"server busy: {message}; gave up after {retries} retries", EXIT_BUSY)
            wait = retry_after_seconds(response)
            print(f"server busy ({message}); retrying in {wait:g} s ({attempt + 1}/{retries})", file=log)
            time.sleep(wait)
            continue
        raise CommandError(message, EXIT_REJECTED if 400 <= response.status_code < 500 else EXIT_FAILED)
    raise AssertionError("unreachable")


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs from the lines of a ``text/event-stream``."""
    name, data = "message", list[str]()
    for line in lines:
        if line == "":
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].lstrip())
    if data:
        yield name, json.loads("\n".join(data))


def follow(client: httpx.Client, job_id: str, progress: bool, log: TextIO) -> dict[str, Any]:
    """The job's final status, with a progress bar from its step events.

    Falls back to polling ``GET /v1/jobs/{id}`` if the event stream breaks off.
    """
    bar = None
    try:
        with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=httpx.Timeout(30.0, read=None)) as stream:
            if stream.status_code != 200:
                stream.read()
                raise CommandError(f"cannot follow job {job_id}: {error_message(stream)}")
            for name, data in sse_events(stream.iter_lines()):
                if name == "step":
                    if bar is None:
                        bar = tqdm(
                            total=data["steps"],
                            unit="step",
                            desc="denoising",
                            disable=not progress,
                            file=log,
                            dynamic_ncols=True,
                        )
                    bar.update(data["step"] - bar.n)
                    bar.set_postfix(batch=data.get("batch_size"), refresh=False)
                elif name == "result":
                    return data
    except httpx.TransportError as error:
        print(f"event stream interrupted ({error}); polling the job", file=log)
    finally:
        if bar is not None:
            bar.close()
    return poll(client, job_id)


def poll(client: httpx.Client, job_id: str, interval: float = 1.0) -> dict[str, Any]:
    while True:
        response = client.get(f"/v1/jobs/{job_id}")
        if response.status_code != 200:
            raise CommandError(f"cannot read job {job_id}: {error_message(response)}")
        status: dict[str, Any] = response.json()
        if status["status"] in ("succeeded", "failed", "cancelled"):
            return status
        time.sleep(interval)


# --------------------------------------------------------------------------- output


def slug(text: str) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40] or "image"


def save_images(result: dict[str, Any], prompt: str, output: Path) -> list[tuple[Path, dict[str, Any]]]:
    output.mkdir(parents=True, exist_ok=True)
    extension = {"jpeg": "jpg"}.get(result["output_format"], result["output_format"])
    saved = []
    for image in result["images"]:
        path = output / f"{slug(prompt)}-seed{image['seed']}.{extension}"
        path.write_bytes(base64.b64decode(image["b64_json"]))
        saved.append((path, image))
    return saved


def stats_table(saved: list[tuple[Path, dict[str, Any]]]) -> str:
    width = max([len("file")] + [len(str(path)) for path, _ in saved])
    header = f"{'file':<{width}} {'seed':>6} {'compute s':>9} {'queue s':>8} {'hit rate':>8} {'MACs':>6}  method"
    rows = [header]
    for path, image in saved:
        s = image["stats"]
        rows.append(
            f"{str(path):<{width}} {image['seed']:>6} {s['compute_seconds']:>9.3f} {s['queue_wait_seconds']:>8.3f} "
            f"{s['cache_hit_rate']:>8.1%} {s['mac_fraction']:>6.1%}  {s['method']}"
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------- entry point


def run(args: argparse.Namespace, out: TextIO, log: TextIO) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    server = args.server.rstrip("/")
    with httpx.Client(base_url=server, headers=headers, timeout=60.0) as client:
        job_id = None
        try:
            job = submit(client, request_body(args), args.retries, log)
            job_id = job["id"]
            print(f"job {job_id} queued on {server}", file=log)
            status = follow(client, job_id, progress=not args.no_progress, log=log)
        except KeyboardInterrupt:
            if job_id is not None:
                try:
                    client.delete(f"/v1/jobs/{job_id}", timeout=10.0)
                    print(f"interrupted: job {job_id} cancelled", file=log)
                except httpx.HTTPError:
                    print(f"interrupted: could not cancel job {job_id}", file=log)
            return EXIT_INTERRUPTED
        except httpx.TransportError as error:
            raise CommandError(f"cannot reach the server at {server}: {error}") from error
    if status["status"] != "succeeded":
        job_error = status.get("error") or {}
        detail = job_error.get("message") or status["status"]
        raise CommandError(
            f"job {status['id']} {status['status']}: {detail}"
            + (f" (HTTP {job_error['status']} {job_error.get('code', '')})" if "status" in job_error else "")
        )
    saved = save_images(status["result"], args.prompt, args.output)
    if args.json:
        for path, image in saved:
            print(json.dumps({"file": str(path), "seed": image["seed"], "stats": image["stats"]}), file=out)
    else:
        print(stats_table(saved), file=out)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``fastcache-generate``)."""
    args = build_parser().parse_args(argv)
    try:
        code = run(args, sys.stdout, sys.stderr)
    except CommandError as error:
        print(f"fastcache-generate: error: {error}", file=sys.stderr)
        code = error.exit_code
    sys.exit(code)


if __name__ == "__main__":
    main()
