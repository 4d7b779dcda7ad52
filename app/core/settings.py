"""Typed settings read from the environment (and `.env`), validated once at startup.

Queue-wide values are optional here: ``None`` means "not set in the environment", so the
queue's own ``WorkerSettings`` and then the built-in default can apply (see
``components.worker.config``). ``WORKER_BACKEND_<QUEUE>`` is read dynamically because the
queue names are only known after discovery.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import Literal

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
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
    # Sentinel (app/core/redis.py): with REDIS_SENTINELS set, every client asks these Sentinels for
    # the current master of REDIS_SENTINEL_MASTER instead of using REDIS_URL's host.
    redis_sentinels: str = ""
    redis_sentinel_master: str = ""
    redis_sentinel_username: str | None = None
    redis_sentinel_password: str | None = None
    # After an enqueue, WAIT until this many replicas acknowledged it (0: off), at most this long.
    redis_wait_replicas: int = Field(default=0, ge=0, le=100)
    redis_wait_timeout_ms: int = Field(default=1000, ge=1)
    # Redis Cluster: every client is a cluster client (REDIS_URL names any node); see app/core/redis_cluster.py.
    redis_cluster: bool = False

    # Engines and queue-wide tuning (None: fall back to the queue's WorkerSettings)
    worker_backend: Engine = "arq"
    worker_processes: int | None = Field(default=None, ge=1, le=256)
    worker_threads: int | None = Field(default=None, ge=1, le=10_000)
    worker_timeout_seconds: float | None = Field(default=None, gt=0)
    worker_max_tries: int | None = Field(default=None, ge=1)
    worker_keep_result_seconds: int | None = Field(default=None, ge=1)
    # How long a job that ended failed stays in its queue's dead set (app dead), record and result with it.
    worker_dead_ttl_seconds: int = Field(default=604_800, gt=0)
    worker_queue_type: str = "system"
    worker_retry_backoff_seconds: float = Field(default=1.0, ge=0)
    worker_retry_backoff_max_seconds: float = Field(default=300.0, ge=0)
    worker_max_payload_bytes: int = Field(default=1_000_000, ge=1)

    # Identity and discovery
    worker_id: str | None = None
    worker_labels: str = ""
    worker_group: str = ""
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
    # Longest wait of a delayed mover between two checks when no wake-up comes (runtime/delayed.py).
    worker_delay_poll_seconds: float = Field(default=1.0, gt=0)
    worker_idle_poll_ms: float | None = Field(default=None, gt=0)

    # Schedules (app/components/scheduler): the operators' YAML file, the scheduler's longest
    # sleep between passes, and how long a claimed tick waits for its enqueue before another
    # scheduler takes it over.
    worker_schedules_file: str | None = None
    worker_scheduler_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    worker_scheduler_lease_seconds: float = Field(default=30.0, gt=0)

    # Workflows (app/components/workflows): how long an ended run is kept, how often one
    # process sweeps the active runs, and whether worker processes advance runs at all.
    workflow_keep_seconds: int = Field(default=7 * 24 * 3600, ge=1)
    workflow_sweep_seconds: float = Field(default=2.0, gt=0)
    workflow_reconciler: bool = True

    # Dashboard (`app dashboard`): actions need `Authorization: Bearer <token>`; unset, it is read-only.
    dashboard_token: SecretStr | None = None

    environment: str = "development"
    app_env: str | None = None

    @field_validator("redis_url", "redis_url_local")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_redis_url(value)
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _check_sentinels(cls, value: str) -> str:
        parse_sentinels(value)
        return value.strip()

    @field_validator("redis_sentinel_master")
    @classmethod
    def _check_master(cls, value: str) -> str:
        value = value.strip()
        if value and not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise ValueError("use the master's name as configured in the Sentinels (letters, digits, . _ -)")
        return value

    @model_validator(mode="after")
    def _check_sentinel_pair(self) -> Settings:
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_master):
            raise ValueError("REDIS_SENTINELS and REDIS_SENTINEL_MASTER go together: set both (host:port,... "
                             "and the master's name) or neither")
        if self.redis_wait_replicas and self.redis_wait_timeout_ms >= self.redis_socket_timeout * 1000:
            raise ValueError(f"REDIS_WAIT_TIMEOUT_MS={self.redis_wait_timeout_ms} must stay under REDIS_SOCKET_TIMEOUT "
                             f"({self.redis_socket_timeout:g}s), or the wait is cut off as a dead connection")
        if self.redis_cluster and self.redis_sentinels:
            raise ValueError("REDIS_CLUSTER and REDIS_SENTINELS exclude each other (a Redis Cluster fails over by "
                             "itself): set one of them")
        return self

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """REDIS_SENTINELS as (host, port) pairs; empty without Sentinel."""
        return parse_sentinels(self.redis_sentinels)

    @field_validator("worker_group")
    @classmethod
    def _check_group(cls, value: str) -> str:
        from app.components.worker.routing.options import check_group

        value = value.strip()
        if value:
            try:
                check_group(value, "WORKER_GROUP")
            except Exception as exc:  # noqa: BLE001 - reported as a settings error, which names the variable
                raise ValueError(str(exc).partition(" is invalid: ")[2] or str(exc)) from None
        return value

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

    def max_concurrency_for(self, queue: str) -> int | None:
        """`WORKER_MAX_CONCURRENCY_<QUEUE>`: at most that many jobs of the queue run at once,
        across every worker (0 or unset: no limit from the environment)."""
        var = "WORKER_MAX_CONCURRENCY_" + queue.upper().replace("-", "_").replace(".", "_")
        raw = os.environ.get(var)
        if raw is None and os.path.exists(".env"):
            raw = dotenv_values(".env").get(var)
        if raw is None or not raw.strip():
            return None
        try:
            value = int(raw.strip())
        except ValueError:
            value = -1
        if value < 0:
            raise ConfigError(f"{var}={raw!r} is invalid: use an integer >= 1 (0 means no limit)")
        return value

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


REDIS_URL_FORM = "redis://[user:password@]host[:port][/db] (or rediss://..., unix:///path/redis.sock)"


def check_redis_url(url: str) -> None:
    """Refuse what redis-py's ``from_url`` would refuse later with a traceback (or misread)."""
    from urllib.parse import urlparse

    parsed = urlparse(url.strip())
    if parsed.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"expected {REDIS_URL_FORM}")
    try:
        parsed.port  # noqa: B018 - raises on a port that is not a number in 0-65535
    except ValueError:
        raise ValueError(f"the port is not a number in 0-65535: expected {REDIS_URL_FORM}") from None
    if parsed.scheme == "unix":
        if not parsed.path:
            raise ValueError(f"a unix URL needs a socket path: expected {REDIS_URL_FORM}")
        return
    if not parsed.hostname:
        raise ValueError(f"no host: expected {REDIS_URL_FORM}")
    db = parsed.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"the database {db!r} is not a number: expected {REDIS_URL_FORM}")


SENTINELS_FORM = "host:port,host:port (the Sentinels, e.g. 10.0.0.1:26379,10.0.0.2:26379)"


def parse_sentinels(value: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` as pairs; raises ValueError naming the expected form."""
    out: list[tuple[str, int]] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in "/@ "):
            raise ValueError(f"{item!r} is not host:port: expected {SENTINELS_FORM}")
        out.append((host, int(port)))
    if value.strip() and not out:
        raise ValueError(f"expected {SENTINELS_FORM}")
    return out


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
        if not first["loc"]:  # a check across settings (model_validator): its message names them
            raise ConfigError(first["msg"].removeprefix("Value error, ").rstrip(".")) from None
        field = str(first["loc"][0])
        value = first.get("input")
        if field.startswith("redis_url") and isinstance(value, str):
            value = re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1***@", value)  # never echo a password
        raise ConfigError(
            f"{field.upper()}={value!r} is invalid: {first['msg'].removeprefix('Value error, ').rstrip('.')}"
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
