"""Console scripts: ``fastcache-serve`` (API, in-process engine by default) and ``fastcache-worker``.

Flag parsing lives in ``service.settings`` so the worker module needs nothing from here (no import circle).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.settings import SERVE_FLAGS, WORKER_FLAGS, parse_settings

if TYPE_CHECKING:
    from types import FrameType

    import uvicorn

__all__ = ["SERVE_FLAGS", "WORKER_FLAGS", "parse_settings", "serve", "worker"]


def serve(argv: list[str] | None = None) -> None:
    """Run the API server (``fastcache-serve``)."""
    import uvicorn

    from service import telemetry
    from service.api.app import build_backend, create_app

    settings = parse_settings(SERVE_FLAGS, "FastCache image-generation server.", argv)
    telemetry.configure_logging(settings.log_level)
    app = create_app(settings, build_backend(settings))
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.resolved_drain_timeout),
    )
    _graceful_server(config).run()


def _graceful_server(config: uvicorn.Config) -> uvicorn.Server:
    """uvicorn's server, exiting 0 after a SIGTERM/SIGINT-triggered graceful drain.

    uvicorn re-raises the captured signal once it has shut down, which turns a clean drain into
    exit status -15; orchestrators and the tests read a clean drain as status 0.
    """
    import uvicorn  # imported here so importing the CLI does not import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()

    return Server(config)


def worker(argv: list[str] | None = None) -> None:
    """Run a GPU worker that takes jobs from Redis (``fastcache-worker``)."""
    from service.worker_process import main

    main(argv)
