"""Redis Cluster (``REDIS_CLUSTER=true``): cluster clients, and what cannot run on Cluster.

``REDIS_URL`` names any node; the client discovers the others (``CLUSTER SLOTS``) and sends
each command to the master of its key's slot, following MOVED/ASK after a resharding or a
failover. The layer keeps every key of one queue under that queue's hash tag
(``<prefix>:{<queue>}:...``, see ``Keys.for_queue``), so each script and pipeline of a queue
touches one slot, and different queues spread over the masters.

The clients keep the single-Redis client's behaviours: the same socket deadlines and retries
(``connection_kwargs``), and one clear line when no node can be reached or the credentials
are refused (the cluster client's own ``RedisClusterException`` is not a ``RedisError``, so
it is turned into a ``ConnectionError`` the layer already explains).

Cluster pipelines cannot be transactions (redis-py 5): the few ``MULTI`` pipelines of the
layer run as plain pipelines there (see ``transactional``); each of them is either made of
idempotent steps or re-checked by a compare-and-set script, so a partial one is harmless.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ConnectionError, RedisClusterException, ResponseError

from app.core.errors import ConfigError

# Engines whose transport can keep all its keys in one queue's slot and talk to a cluster client.
CLUSTER_ENGINES = ("taskiq", "dramatiq")
WHY_NOT = {
    "arq": "arq's ArqRedis is a single-node client and cannot talk to a Redis Cluster (arq#385)",
}


def _cluster_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    if out.pop("db", 0):
        raise ConfigError("REDIS_DB must be 0 (or unset) with REDIS_CLUSTER=true: a Redis Cluster has only db 0")
    return out


def _unreachable(exc: Exception) -> Exception:
    """The cluster client's discovery errors as the errors a single-node client raises."""
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, AuthenticationError) or "WRONGPASS" in text or "NOAUTH" in text:
        return cause if isinstance(cause, AuthenticationError) else AuthenticationError(text.splitlines()[0])
    if "Cluster mode is not enabled" in text or "cluster support disabled" in text:
        return ResponseError("this Redis is not a cluster node (cluster mode is not enabled): unset REDIS_CLUSTER, "
                             "or point REDIS_URL at a node of the cluster")
    return ConnectionError(text.splitlines()[0] if text else type(exc).__name__)


class AsyncCluster(aioredis.RedisCluster):
    """redis-py's asyncio cluster client; discovery failures raise what the layer explains."""

    async def initialize(self) -> AsyncCluster:
        try:
            await super().initialize()
        except RedisClusterException as exc:
            raise _unreachable(exc) from None
        return self


class SyncCluster(redis.RedisCluster):
    """The sync twin (the heartbeat thread, the CLI's sync paths)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(*args, **kwargs)
        except RedisClusterException as exc:
            raise _unreachable(exc) from None


def async_client(url: str, kwargs: dict[str, Any]) -> AsyncCluster:
    return AsyncCluster.from_url(url, **_cluster_kwargs(kwargs))  # type: ignore[return-value]


def sync_client(url: str, kwargs: dict[str, Any]) -> SyncCluster:
    kwargs = _cluster_kwargs(kwargs)
    kwargs.pop("health_check_interval", None)
    return SyncCluster.from_url(url, **kwargs)  # type: ignore[return-value]


def is_cluster(client: Any) -> bool:
    return isinstance(client, (aioredis.RedisCluster, redis.RedisCluster))


def transactional(client: Any) -> bool:
    """``transaction=`` for a pipeline whose keys share one slot: MULTI on a single Redis; on a
    cluster client a plain pipeline (redis-py's cluster pipelines have no transactions)."""
    return not is_cluster(client)


def refuse_engine(engine: str, queue: str) -> None:
    """Raise one line when ``engine`` cannot run on Redis Cluster."""
    if engine in CLUSTER_ENGINES:
        return
    why = WHY_NOT.get(engine, f"{engine} cannot keep its keys in one slot")
    raise ConfigError(
        f"queue {queue!r} uses {engine} but REDIS_CLUSTER=true: {why}; on Redis Cluster use "
        f"{' or '.join(CLUSTER_ENGINES)} (--backend / WORKER_BACKEND_{queue.upper().replace('-', '_')})"
    )


WORKFLOWS = ("workflows", "a run's steps span queues (hence hash slots) and its reconciler reads one "
             "deployment-wide events stream")
DASHBOARD = ("the dashboard", "it folds one deployment-wide events stream; use `app queues`, `app workers`, "
             "`app events`, which read each queue's keys")


def refuse_feature(settings: Any, feature: tuple[str, str]) -> None:
    """Raise one line when a deployment-wide feature is asked for on Redis Cluster."""
    if getattr(settings, "redis_cluster", False):
        what, why = feature
        raise ConfigError(f"{what} cannot run with REDIS_CLUSTER=true: {why}; run them against a single "
                          "Redis (or Sentinel)")
