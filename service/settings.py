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
    model: str = Field(DEFAULT_MODEL, description="diffusers pipeline directory or hub id; default: the bundled digits DiT")
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
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's choice")
    log_level: str = Field("info")
    # worker only
    redis: str | None = Field(None, description="worker: redis:// URL of the job stream")
    metrics_port: int = Field(9100, ge=0, le=65535, description="worker: port of its /metrics")
    reclaim_idle_seconds: float = Field(120.0, gt=0, description="worker: reclaim jobs idle this long")
    max_deliveries: int = Field(3, ge=1, description="worker: deliveries before a job is dead-lettered")

    @field_validator("api_key", "redis", "model_name", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # an empty FASTCACHE_API_KEY= (as compose files write it) means "no key", not "the empty key"
        return None if value == "" else value

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
