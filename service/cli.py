"""Console scripts: ``fastcache-serve`` (API, in-process engine by default) and ``fastcache-worker``."""

from __future__ import annotations

import argparse
from typing import Any

from service.settings import Settings

SERVE_FLAGS = ("host", "port", "model", "model_name", "device", "dtype", "max_batch_size", "max_queue", "api_key",
               "queue", "request_timeout", "max_body_bytes", "job_ttl_seconds", "threads", "log_level")
WORKER_FLAGS = ("redis", "host", "model", "model_name", "device", "dtype", "max_batch_size", "max_queue", "metrics_port",
                "reclaim_idle_seconds", "max_deliveries", "job_ttl_seconds", "threads", "log_level")


def parse_settings(flags: tuple[str, ...], description: str, argv: list[str] | None) -> Settings:
    """Settings from the environment, overridden by the flags given on the command line."""
    env = Settings()
    parser = argparse.ArgumentParser(description=description,
                                     epilog="Every flag can also be set as FASTCACHE_<FLAG> in the environment.")
    for name in flags:
        info = Settings.model_fields[name]
        default = getattr(env, name)
        if hasattr(default, "get_secret_value"):
            default = "***"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                            help=f"{info.description or name} (now: {default})")
    args = parser.parse_args(argv)
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**{**env.model_dump(), **given})


def serve(argv: list[str] | None = None) -> None:
    """Run the API server (``fastcache-serve``)."""
    import uvicorn

    from service import telemetry
    from service.api.app import build_backend, create_app

    settings = parse_settings(SERVE_FLAGS, "FastCache image-generation server.", argv)
    telemetry.configure_logging(settings.log_level)
    app = create_app(settings, build_backend(settings))
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=int(settings.request_timeout) + 30)
    _GracefulServer(config).run()


class _GracefulServer:
    """uvicorn's server, exiting 0 after a SIGTERM/SIGINT-triggered graceful drain.

    uvicorn re-raises the captured signal once it has shut down, which turns a clean drain into
    exit status -15; orchestrators and the tests read a clean drain as status 0.
    """

    def __new__(cls, config):  # built lazily so importing the CLI does not import uvicorn
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                super().handle_exit(sig, frame)
                getattr(self, "_captured_signals", []).clear()

        return Server(config)


def worker(argv: list[str] | None = None) -> None:
    """Run a GPU worker that takes jobs from Redis (``fastcache-worker``)."""
    from service.worker import run_worker

    run_worker(parse_settings(WORKER_FLAGS, "FastCache worker: runs jobs from a Redis stream.", argv))
