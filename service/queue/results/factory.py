"""``--result-store``: from its value (``memory``, ``redis``, ``file:///dir``, ``s3://bucket/prefix``) to a store."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlparse

from service.queue.results.base import InlineStore, ResultStore

if TYPE_CHECKING:
    from service.settings import Settings


def result_store_url(settings: Settings) -> str:
    """The store ``settings`` name: ``--result-store``, else ``redis`` with a Redis queue and ``memory`` without."""
    if settings.result_store:
        return settings.result_store
    queue = settings.redis or settings.queue
    return "redis" if queue.startswith(("redis://", "rediss://", "unix://")) else "memory"


def open_result_store(url: str, *, shared: bool, public_endpoint: str | None = None) -> ResultStore:
    """The store named by ``url``. ``shared``: API replicas and workers are separate processes (Redis mode).
    ``public_endpoint``: S3 only, the endpoint that presigned URLs name (``--result-public-endpoint``).

    ``ValueError`` (naming the flag) for a value that is not a store, or a store that cannot work in
    this mode: ``memory`` is one process's memory, ``redis`` needs the Redis queue.
    """
    if url == "memory":
        if shared:
            raise ValueError(
                "--result-store memory keeps images in one process; with Redis use redis, file:// or s3://"
            )
        return InlineStore("memory")
    if url == "redis":
        if not shared:
            raise ValueError("--result-store redis needs --queue redis://...; in-process mode uses memory")
        return InlineStore("redis")
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc or not parsed.path.startswith("/"):
            raise ValueError(f"--result-store file:// takes an absolute path (file:///data/results); got {url!r}")
        from service.queue.results.directory import DirectoryStore

        return DirectoryStore(parsed.path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"--result-store s3:// needs a bucket (s3://bucket/prefix); got {url!r}")
        from service.queue.results.s3 import S3Store

        return S3Store(parsed.netloc, parsed.path, public_endpoint=public_endpoint)
    raise ValueError(f"--result-store must be memory, redis, file:///dir or s3://bucket/prefix; got {url!r}")
