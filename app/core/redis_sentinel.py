"""Redis Sentinel: every client of the layer and of the engines talks to the current master.

With ``REDIS_SENTINELS`` set, ``app.core.redis`` builds its clients and pools here instead of
from ``REDIS_URL``'s host: redis-py's ``SentinelConnectionPool`` asks the Sentinels for the
master of ``REDIS_SENTINEL_MASTER`` each time it opens a connection, so after a failover the
next connection (the retry of a command that failed on the old master) finds the new one.
Everything else of a connection stays as ``connection_kwargs`` builds it: the retry (which
does not retry authentication errors), the socket deadline, the pool size; the credentials,
database and TLS options of ``REDIS_URL`` (and the REDIS_* overrides) apply to the master.
The Sentinels themselves get ``REDIS_SENTINEL_USERNAME`` / ``REDIS_SENTINEL_PASSWORD``, TLS
when ``REDIS_SSL`` is on (or ``REDIS_URL`` is ``rediss://``), and the connect timeout.

A master that Sentinel demoted to replica answers writes with ``READONLY``; redis-py turns
that into a reconnect only for plain commands. A script that writes fails inside the script
instead (Redis 6.2: ``ERR Error running script ... -READONLY ...``), which would reach the
caller as a plain error: here it is turned into the same reconnect. A script refused on a
replica wrote nothing, so running it again on the master is safe.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio import sentinel as async_sentinel
from redis.asyncio.connection import parse_url as async_parse_url
from redis.exceptions import AuthenticationError, ConnectionError, ReadOnlyError, ResponseError, TimeoutError

from app.core.settings import Settings

URL_OPTIONS_DROPPED = ("host", "port", "path", "connection_class")


def _demoted(error: ResponseError) -> bool:
    """A write refused because the server is a replica now (plain command or inside a script)."""
    return isinstance(error, ReadOnlyError) or "READONLY" in str(error)[:300]


class _MasterConnection(async_sentinel.SentinelManagedConnection):
    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if self.connection_pool.is_master and _demoted(exc):
                await self.disconnect()
                raise ConnectionError("the previous master is now a replica") from None
            raise


class _MasterSSLConnection(_MasterConnection, aioredis.SSLConnection):
    pass


class _SyncMasterConnection(redis.sentinel.SentinelManagedConnection):
    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if self.connection_pool.is_master and _demoted(exc):
                self.disconnect()
                raise ConnectionError("the previous master is now a replica") from None
            raise


class _SyncMasterSSLConnection(_SyncMasterConnection, redis.SSLConnection):
    pass


class _BlockingPool(async_sentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """A Sentinel pool that waits for a free connection (what TaskIQ's broker builds for itself)."""


def tls(settings: Settings) -> bool:
    return settings.redis_ssl or settings.effective_redis_url.startswith("rediss://")


def url_options(settings: Settings) -> dict[str, Any]:
    """What REDIS_URL says besides its address: credentials, database, TLS options."""
    url = settings.effective_redis_url
    if url.startswith("unix://"):
        return {}
    options = async_parse_url(url)
    return {k: v for k, v in options.items() if k not in URL_OPTIONS_DROPPED}


def sentinel_kwargs(settings: Settings, tls_options: dict[str, Any], deadline: float | None = None) -> dict[str, Any]:
    """Connection options for the Sentinels themselves: the connect timeout, or the client's
    own deadline when shorter (the heartbeat's), so asking a hung Sentinel costs no more."""
    timeout = min(settings.redis_connection_timeout, deadline or settings.redis_connection_timeout)
    out: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "socket_keepalive": settings.redis_socket_keepalive,
    }
    if settings.redis_sentinel_username:
        out["username"] = settings.redis_sentinel_username
    if settings.redis_sentinel_password:
        out["password"] = settings.redis_sentinel_password
    if tls(settings):
        out["ssl"] = True
        out.update(tls_options)
    return out


def _master_kwargs(settings: Settings, kwargs: dict[str, Any], sync: bool) -> dict[str, Any]:
    options = url_options(settings)
    tls_options = {k: v for k, v in options.items() if k.startswith("ssl_")}
    if not tls(settings):  # ssl_* options of a plain connection: redis-py would refuse them
        options = {k: v for k, v in options.items() if not k.startswith("ssl")}
    merged = {**options, **kwargs}
    merged.pop("ssl", None)
    if sync:
        merged["connection_class"] = _SyncMasterSSLConnection if tls(settings) else _SyncMasterConnection
    else:
        merged["connection_class"] = _MasterSSLConnection if tls(settings) else _MasterConnection
    merged["sentinel_kwargs"] = sentinel_kwargs(settings, tls_options, merged.get("socket_timeout"))
    return merged


def _split(merged: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    merged = dict(merged)
    return merged.pop("sentinel_kwargs"), merged


def async_master(settings: Settings, kwargs: dict[str, Any]) -> aioredis.Redis:
    """An asyncio client of the current master."""
    for_sentinels, for_master = _split(_master_kwargs(settings, kwargs, sync=False))
    manager = async_sentinel.Sentinel(settings.sentinels, sentinel_kwargs=for_sentinels)
    return manager.master_for(settings.redis_sentinel_master, **for_master)


def async_pool(settings: Settings, kwargs: dict[str, Any], *, blocking: bool = False) -> aioredis.ConnectionPool:
    """A connection pool of the current master, for an engine that builds its own client on it."""
    for_sentinels, for_master = _split(_master_kwargs(settings, kwargs, sync=False))
    manager = async_sentinel.Sentinel(settings.sentinels, sentinel_kwargs=for_sentinels)
    pool_class = _BlockingPool if blocking else async_sentinel.SentinelConnectionPool
    return pool_class(settings.redis_sentinel_master, manager, is_master=True, **for_master)


def sync_master(settings: Settings, kwargs: dict[str, Any]) -> redis.Redis:
    """A blocking client of the current master (Dramatiq, the heartbeat thread, the CLI)."""
    for_sentinels, for_master = _split(_master_kwargs(settings, kwargs, sync=True))
    manager = redis.sentinel.Sentinel(settings.sentinels, sentinel_kwargs=for_sentinels)
    return manager.master_for(settings.redis_sentinel_master, **for_master)


def describe(settings: Settings) -> str:
    """The master's name and the Sentinels, for messages."""
    where = ",".join(f"{host}:{port}" for host, port in settings.sentinels)
    return f"master {settings.redis_sentinel_master!r} via Sentinels {where}"


def explain(exc: BaseException, settings: Settings) -> str | None:
    """One line for a failure to find or reach the master; None for any other error."""
    where = ",".join(f"{host}:{port}" for host, port in settings.sentinels)
    name = settings.redis_sentinel_master
    if not isinstance(exc, async_sentinel.MasterNotFoundError | redis.sentinel.MasterNotFoundError):
        unanswered = isinstance(exc, TimeoutError) and "connecting" not in str(exc)  # a read: the generic line
        if isinstance(exc, ConnectionError | TimeoutError | OSError) and not (isinstance(exc, AuthenticationError)
                                                                             or unanswered):
            return (f"cannot reach master {name!r}, which the Sentinels at {where} name ({exc.__class__.__name__}): "
                    "a failover may be under way (retry in a few seconds), or no replica could take over")
        return None
    text = str(exc)
    if "Authentication" in text or "NOAUTH" in text or "WRONGPASS" in text:
        return (f"the Sentinels at {where} refused the credentials: check REDIS_SENTINEL_PASSWORD / "
                "REDIS_SENTINEL_USERNAME")
    unreachable = text.count(" - ")
    if unreachable >= len(settings.sentinels):
        return (f"cannot reach any Sentinel at {where}: start them, or fix REDIS_SENTINELS "
                "(host:port of each Sentinel)")
    return (f"no Sentinel at {where} knows a healthy master named {name!r}: check REDIS_SENTINEL_MASTER "
            "(`SENTINEL MASTERS` on a Sentinel lists the names), or wait for the failover in progress to end")
