"""Service configuration from the environment (``FASTCACHE_*``) and command-line flags.

Every flag of ``fastcache-serve`` / ``fastcache-worker`` has an environment variable: the flag's name
upper-cased with ``FASTCACHE_`` in front (``--max-batch-size`` -> ``FASTCACHE_MAX_BATCH_SIZE``).
Flags win over the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = str(Path(__file__).resolve().parents[1] / "models" / "digits-dit")


class Settings(BaseSettings):
    """Settings of the API server and of the worker."""

    model_config = SettingsConfigDict(env_prefix="FASTCACHE_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to listen on (the worker: for its /metrics port)")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    model: str = Field(
        DEFAULT_MODEL, description="diffusers pipeline directory or hub id; default: the bundled digits DiT"
    )
    model_name: str | None = Field(None, description="name reported by the API; default: the model directory's name")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto")
    dtype: str = Field("auto", description="float32, float16, bfloat16 or auto (float32 on CPU, bfloat16 on CUDA)")
    max_batch_size: int = Field(8, ge=1, le=256, description="images denoised together at most")
    max_queue: int = Field(64, ge=1, description="requests waiting at most; more get 429")
    api_key: SecretStr | None = Field(None, description="bearer token required on generation routes")
    queue: str = Field("local", description="'local' (in-process) or a redis:// URL (scale-out)")
    request_timeout: float = Field(600.0, gt=0, description="default deadline of a request, seconds")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="largest accepted request body")
    job_ttl_seconds: int = Field(3600, ge=10, description="how long finished jobs stay readable")
    max_result_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="in-process queue: bytes of finished results' images kept at most (oldest dropped first)",
    )
    drain_timeout: float | None = Field(
        None,
        gt=0,
        description="seconds a stopping process lets in-flight work finish; default: the request timeout + 30",
    )
    idle_release_seconds: float = Field(
        60.0, ge=0, description="release pooled cache memory after this long with no work"
    )
    redis_timeout: float = Field(
        5.0, gt=0, description="seconds a Redis operation may take before it counts as an outage (503)"
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads; default on CPU: one fewer than torch's choice (a core for HTTP and encoding)",
    )
    log_level: str = Field("info")
    result_store: str | None = Field(
        None,
        description="where finished images rest: memory, redis, file:///dir or s3://bucket/prefix "
        "(S3 endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_DEFAULT_REGION); default: memory in-process, redis with a Redis queue",
    )
    result_url_ttl_seconds: int = Field(
        3600, ge=1, le=7 * 24 * 3600, description="how long an image URL (response_format url) stays valid"
    )
    result_public_endpoint: str | None = Field(
        None,
        description="S3 store: the endpoint URL clients reach, for presigned URLs (when they cannot reach "
        "AWS_ENDPOINT_URL, as with MinIO inside docker compose); default: AWS_ENDPOINT_URL",
    )
    result_url_secret: SecretStr | None = Field(
        None,
        description="HMAC key of the API's signed /v1/files URLs; default: a random key shared by the replicas "
        "through Redis (in-process: one per process)",
    )
    # worker only
    redis: str | None = Field(None, description="worker: redis:// URL of the job stream")
    metrics_port: int = Field(9100, ge=0, le=65535, description="worker: port of its /metrics")
    reclaim_idle_seconds: float = Field(120.0, gt=0, description="worker: reclaim jobs idle this long")
    max_deliveries: int = Field(3, ge=1, description="worker: deliveries before a job is dead-lettered")
    dead_letter_maxlen: int = Field(10_000, ge=1, description="entries kept in the dead-letter stream (oldest trimmed)")

    @field_validator(
        "api_key", "redis", "model_name", "result_store", "result_url_secret", "result_public_endpoint", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # an empty FASTCACHE_API_KEY= (as compose files write it) means "no key", not "the empty key"
        return None if value == "" else value

    @property
    def resolved_drain_timeout(self) -> float:
        return self.drain_timeout if self.drain_timeout is not None else self.request_timeout + 30.0

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.model.rstrip("/")).name

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.resolved_device().startswith("cuda") else "float32"


SERVE_FLAGS = (
    "host",
    "port",
    "model",
    "model_name",
    "device",
    "dtype",
    "max_batch_size",
    "max_queue",
    "api_key",
    "queue",
    "request_timeout",
    "max_body_bytes",
    "job_ttl_seconds",
    "max_result_bytes",
    "drain_timeout",
    "idle_release_seconds",
    "redis_timeout",
    "threads",
    "log_level",
    "result_store",
    "result_url_ttl_seconds",
    "result_url_secret",
    "result_public_endpoint",
)
WORKER_FLAGS = (
    "redis",
    "host",
    "model",
    "model_name",
    "device",
    "dtype",
    "max_batch_size",
    "max_queue",
    "metrics_port",
    "reclaim_idle_seconds",
    "max_deliveries",
    "dead_letter_maxlen",
    "job_ttl_seconds",
    "drain_timeout",
    "idle_release_seconds",
    "redis_timeout",
    "threads",
    "log_level",
    "result_store",
)


def parse_settings(flags: tuple[str, ...], description: str, argv: list[str] | None) -> Settings:
    """Settings from the environment, overridden by the flags given on the command line."""
    import argparse

    env = Settings()
    parser = argparse.ArgumentParser(
        description=description, epilog="Every flag can also be set as FASTCACHE_<FLAG> in the environment."
    )
    for name in flags:
        info = Settings.model_fields[name]
        default = getattr(env, name)
        if hasattr(default, "get_secret_value"):
            default = "***"
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=None, help=f"{info.description or name} (now: {default})"
        )
    args = parser.parse_args(argv)
    given: dict[str, object] = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**{**env.model_dump(), **given})
