"""Typed settings read from the environment (and `.env`), validated once at startup.

Queue-wide values are optional here: ``None`` means "not set in the environment", so the
queue's own ``WorkerSettings`` and then the built-in default can apply (see
``components.worker.config``). ``WORKER_BACKEND_<QUEUE>`` is read dynamically because the
queue names are only known after discovery.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal

from dotenv import dotenv_values
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.errors import ConfigError

ENGINES = ("arq", "dramatiq", "taskiq")
Engine = Literal["arq", "dramatiq", "taskiq"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # Redis
    redis_url: str = "redis://localhost:6379"
    redis_url_local: str | None = None
    docker_container: bool = False
    redis_db: int | None = Field(default=None, ge=0)
    redis_username: str | None = None
    redis_password: str | None = None
    redis_ssl: bool = False
    redis_max_connections: int = Field(default=50, ge=1)
    redis_connection_timeout: float = Field(default=5.0, gt=0)
    # Deadline of every Redis read/write: a half-open connection fails after this, not after the kernel's TCP timeout.
    redis_socket_timeout: float = Field(default=10.0, gt=1)
    redis_socket_keepalive: bool = True

    # Engines and queue-wide tuning (None: fall back to the queue's WorkerSettings)
    worker_backend: Engine = "arq"
    worker_processes: int | None = Field(default=None, ge=1, le=256)
    worker_threads: int | None = Field(default=None, ge=1, le=10_000)
    worker_timeout_seconds: float | None = Field(default=None, gt=0)
    worker_max_tries: int | None = Field(default=None, ge=1)
    worker_keep_result_seconds: int | None = Field(default=None, ge=1)
    worker_queue_type: str = "system"
    worker_retry_backoff_seconds: float = Field(default=1.0, ge=0)
    worker_retry_backoff_max_seconds: float = Field(default=300.0, ge=0)
    worker_max_payload_bytes: int = Field(default=1_000_000, ge=1)

    # Identity and discovery
    worker_id: str | None = None
    worker_labels: str = ""
    worker_key_prefix: str = "worker"
    worker_queue_packages: str = "app.components.worker.queues"
    worker_middleware: str = ""

    # Timing and trail
    worker_heartbeat_interval: float = Field(default=1.0, gt=0)
    worker_warning_after: float = Field(default=5.0, gt=0)
    worker_unhealthy_after: float = Field(default=15.0, gt=0)
    worker_offline_after: float = Field(default=30.0, gt=0)
    worker_shutdown_timeout: float = Field(default=30.0, ge=0)
    worker_events_maxlen: int = Field(default=100_000, ge=100)
    worker_delay_poll_seconds: float = Field(default=0.05, gt=0)
    worker_idle_poll_ms: float | None = Field(default=None, gt=0)

    environment: str = "development"
    app_env: str | None = None

    @field_validator("worker_backend", mode="before")
    @classmethod
    def _lower_backend(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def effective_redis_url(self) -> str:
        """``REDIS_URL_LOCAL`` wins outside a container, so host CLI commands reach the
        port that compose publishes while containers use the service name."""
        if not self.docker_container and self.redis_url_local:
            return self.redis_url_local
        return self.redis_url

    @property
    def queue_packages(self) -> list[str]:
        return [p.strip() for p in self.worker_queue_packages.split(",") if p.strip()]

    @property
    def middleware_paths(self) -> list[str]:
        return [p.strip() for p in self.worker_middleware.split(",") if p.strip()]

    @property
    def labels(self) -> dict[str, str]:
        return parse_labels(self.worker_labels.split(",") if self.worker_labels else [])

    def backend_for(self, queue: str) -> str | None:
        """The engine the environment names for one queue (`WORKER_BACKEND_<QUEUE>`), if any."""
        var = "WORKER_BACKEND_" + queue.upper().replace("-", "_")
        raw = os.environ.get(var)
        if raw is None and os.path.exists(".env"):
            raw = dotenv_values(".env").get(var)
        if raw is None:
            return None
        value = raw.strip().lower()
        if value not in ENGINES:
            raise ConfigError(f"{var}={raw!r} is invalid: use one of {', '.join(ENGINES)}")
        return value


def parse_labels(items: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"label {item!r} is invalid: write labels as key=value")
        labels[key.strip()] = value.strip()
    return labels


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning a validation error into one line that names the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        value = first.get("input")
        raise ConfigError(
            f"{field.upper()}={value!r} is invalid: {first['msg'].rstrip('.')}"
            f"{_accepts(field)}"
        ) from None


def _accepts(field: str) -> str:
    if field == "worker_backend":
        return f" (use one of {', '.join(ENGINES)})"
    return ""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings of this process, read once. Tests and the CLI may build their own."""
    return load_settings()
