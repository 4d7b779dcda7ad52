"""Redis connections built from settings, the same way for the layer and every engine."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, ConnectionError, ResponseError, TimeoutError
from redis.retry import Retry as SyncRetry

from app.core import (
    redis_cancel,  # noqa: F401 - applied on import: writes never swallow a cancellation
    redis_sentinel,
)
from app.core.errors import RedisUnavailable
from app.core.settings import Settings


class _NotRetried(Exception):
    """Carries an error out of redis-py's retry loop untouched."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _SyncRetry(SyncRetry):
    """redis-py's retry, except for authentication errors.

    redis-py maps ``NOAUTH`` and ``WRONGPASS`` to ``AuthenticationError``, a subclass of
    ``ConnectionError``, so a plain retry treats a missing password as a network blip. Worse,
    with no password the first command's health-check PING runs inside the connection's
    handshake; its NOAUTH makes the retry reconnect, which runs the handshake and the PING
    again: unbounded recursion with backoff sleeps (the hang of ``app queues``, the
    ``RecursionError`` of ``app dev``). Credentials do not fix themselves: fail at once."""

    def call_with_retry(self, do: Any, fail: Any) -> Any:
        def once() -> Any:
            try:
                return do()
            except AuthenticationError as exc:
                fail(exc)
                raise _NotRetried(exc) from exc

        try:
            return super().call_with_retry(once, fail)
        except _NotRetried as wrapped:
            raise wrapped.error from None


class _AsyncRetry(AsyncRetry):
    """The asyncio twin of ``_SyncRetry``."""

    async def call_with_retry(self, do: Any, fail: Any) -> Any:
        async def once() -> Any:
            try:
                return await do()
            except AuthenticationError as exc:
                await fail(exc)
                raise _NotRetried(exc) from exc

        try:
            return await super().call_with_retry(once, fail)
        except _NotRetried as wrapped:
            raise wrapped.error from None


def connection_kwargs(settings: Settings, *, sync: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``redis.from_url`` that apply the REDIS_* overrides to the URL.

    A command on a connection that Redis closed (a restart, an idle timeout) is retried on a
    fresh one a few times (0.05 s doubling to 1 s), so a producer's first call after a Redis
    restart succeeds instead of failing with "Connection closed by server".

    Every read and write has a deadline (``REDIS_SOCKET_TIMEOUT``): a half-open connection
    (a peer that vanished without a FIN, a partition, a paused Redis) fails the call after
    that long instead of after the kernel's TCP timeout, which can be many minutes. It must
    exceed the longest blocking read the layer or an engine issues: TaskIQ's and `app events
    --follow`'s XREAD block 1 s; arq and Dramatiq poll without blocking. A timeout is not
    retried: the command may have run, and a dead peer would only cost three more deadlines;
    callers that must get through (the job wrapper's state writes) retry on their own."""
    retry_class = _SyncRetry if sync else _AsyncRetry
    kwargs: dict[str, Any] = {
        "retry": retry_class(ExponentialBackoff(cap=1.0, base=0.05), 3, supported_errors=(ConnectionError,)),
        "retry_on_error": [ConnectionError],
        "socket_timeout": settings.redis_socket_timeout,
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
    kwargs = {**connection_kwargs(settings), **extra}
    if settings.sentinels:
        return redis_sentinel.async_master(settings, kwargs)
    if settings.redis_cluster:  # Redis Cluster: app/core/redis_cluster.py
        from app.core import redis_cluster

        return redis_cluster.async_client(redis_url(settings), kwargs)  # type: ignore[return-value]
    return aioredis.from_url(redis_url(settings), **kwargs)


def async_pool(settings: Settings, *, blocking: bool = False, **extra: Any) -> aioredis.ConnectionPool:
    """A connection pool for an engine that builds its own client on one (arq's ArqRedis,
    TaskIQ's broker); ``blocking``: wait for a free connection instead of failing. On Redis
    Cluster a pool reaches one node only: an engine there talks through ``async_client``."""
    kwargs = {**connection_kwargs(settings), **extra}
    if settings.sentinels:
        return redis_sentinel.async_pool(settings, kwargs, blocking=blocking)
    pool_class = aioredis.BlockingConnectionPool if blocking else aioredis.ConnectionPool
    return pool_class.from_url(redis_url(settings), **kwargs)


def sync_client(settings: Settings, **extra: Any) -> redis.Redis:
    kwargs = {**connection_kwargs(settings, sync=True), **extra}
    if settings.sentinels:
        return redis_sentinel.sync_master(settings, kwargs)
    if settings.redis_cluster:  # Redis Cluster: app/core/redis_cluster.py
        from app.core import redis_cluster

        return redis_cluster.sync_client(redis_url(settings), kwargs)  # type: ignore[return-value]
    return redis.from_url(redis_url(settings), **kwargs)


def heartbeat_client(settings: Settings) -> redis.Redis:
    """The client of the heartbeat thread: a shorter deadline, min(5 s, offline threshold / 3).

    A beat that cannot reach Redis must fail within seconds so the thread logs it, backs off
    and tries again on a fresh connection, and gets a beat in well inside the offline
    threshold once Redis answers again. A closed connection (Redis restarted) is retried
    once, at once, on a fresh one."""
    timeout = min(5.0, settings.worker_offline_after / 3, settings.redis_socket_timeout)
    retry = _SyncRetry(ExponentialBackoff(cap=0.1, base=0.01), 1, supported_errors=(ConnectionError,))
    return sync_client(settings, socket_timeout=timeout, socket_connect_timeout=min(timeout, settings.redis_connection_timeout),
                       retry=retry, retry_on_error=[ConnectionError])


def describe(settings: Settings) -> str:
    """The Redis address without credentials, for messages."""
    if settings.sentinels:
        return redis_sentinel.describe(settings)
    url = redis_url(settings)
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def explain(exc: BaseException, settings: Settings) -> RedisUnavailable:
    """Turn a redis-py exception into one line that says what to do."""
    where = describe(settings)
    if settings.sentinels and (line := redis_sentinel.explain(exc, settings)):
        return RedisUnavailable(line)
    if "NOAUTH" in str(exc) or "Authentication required" in str(exc):
        return RedisUnavailable(
            f"Redis at {where} requires a password: set REDIS_PASSWORD (or put it in REDIS_URL)"
        )
    if isinstance(exc, AuthenticationError) or "WRONGPASS" in str(exc):
        return RedisUnavailable(
            f"Redis at {where} refused the credentials: check REDIS_PASSWORD / REDIS_USERNAME"
        )
    if isinstance(exc, TimeoutError) and "connecting" not in str(exc):
        return RedisUnavailable(
            f"Redis at {where} did not answer within {settings.redis_socket_timeout:g}s (REDIS_SOCKET_TIMEOUT): "
            "check the network to it and whether it is overloaded or paused"
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
