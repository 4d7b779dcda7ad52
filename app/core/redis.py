"""Redis connections built from settings, the same way for the layer and every engine."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, ConnectionError, ResponseError, TimeoutError
from redis.retry import Retry as SyncRetry

from app.core.errors import RedisUnavailable
from app.core.settings import Settings


def connection_kwargs(settings: Settings, *, sync: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``redis.from_url`` that apply the REDIS_* overrides to the URL.

    A command on a connection that Redis closed (a restart, an idle timeout) is retried on a
    fresh one a few times (0.05 s doubling to 1 s), so a producer's first call after a Redis
    restart succeeds instead of failing with "Connection closed by server"."""
    retry_class = SyncRetry if sync else AsyncRetry
    kwargs: dict[str, Any] = {
        "retry": retry_class(ExponentialBackoff(cap=1.0, base=0.05), 3),
        "retry_on_error": [ConnectionError, TimeoutError],
        "socket_connect_timeout": settings.redis_connection_timeout,
        "socket_keepalive": settings.redis_socket_keepalive,
        "max_connections": settings.redis_max_connections,
        "health_check_interval": 30,
    }
    if settings.redis_db is not None:
        kwargs["db"] = settings.redis_db
    if settings.redis_username:
        kwargs["username"] = settings.redis_username
    if settings.redis_password:
        kwargs["password"] = settings.redis_password
    return kwargs


def redis_url(settings: Settings) -> str:
    url = settings.effective_redis_url
    if settings.redis_ssl and url.startswith("redis://"):
        url = "rediss://" + url[len("redis://") :]
    return url


def async_client(settings: Settings, **extra: Any) -> aioredis.Redis:
    return aioredis.from_url(redis_url(settings), **{**connection_kwargs(settings), **extra})


def sync_client(settings: Settings, **extra: Any) -> redis.Redis:
    return redis.from_url(redis_url(settings), **{**connection_kwargs(settings, sync=True), **extra})


def describe(settings: Settings) -> str:
    """The Redis address without credentials, for messages."""
    url = redis_url(settings)
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def explain(exc: BaseException, settings: Settings) -> RedisUnavailable:
    """Turn a redis-py exception into one line that says what to do."""
    where = describe(settings)
    if isinstance(exc, AuthenticationError) or "WRONGPASS" in str(exc) or "NOAUTH" in str(exc):
        return RedisUnavailable(
            f"Redis at {where} refused the credentials: check REDIS_PASSWORD / REDIS_USERNAME"
        )
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return RedisUnavailable(
            f"cannot reach Redis at {where} ({exc.__class__.__name__}): start Redis, fix REDIS_URL, "
            "or run `app dev` for a private one"
        )
    if isinstance(exc, ResponseError):
        return RedisUnavailable(f"Redis at {where} answered with an error: {exc}")
    return RedisUnavailable(f"Redis at {where}: {exc}")


async def ping(client: aioredis.Redis, settings: Settings) -> None:
    try:
        await client.ping()
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line
        raise explain(exc, settings) from None
