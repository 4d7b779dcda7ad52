"""``REDIS_WAIT_REPLICAS``: an enqueue returns only once that many replicas have its writes.

Redis replication is asynchronous: the master answers a write before any replica has it, so
a failover (Sentinel promoting a replica) can lose writes the master had acknowledged. ``WAIT
n timeout`` blocks until n replicas acknowledged every earlier write *of the same connection*,
and cannot run inside a script or MULTI: so the enqueue script and WAIT go out together on one
connection, one after the other without MULTI (``call_script(..., then=WAIT)``: one round trip
plus the replicas' ack).

WAIT narrows the loss, it does not make Redis a consensus store: a job confirmed by n replicas
survives a failover that promotes one of them (Sentinel prefers the most up-to-date replica),
and a write that was not confirmed may still have been applied (the error says so).

If the connection broke and redis-py resent the pipeline, the script recognises the jobs of
its earlier try (flag 2) and writes nothing, so a WAIT on the new connection would confirm
nothing: those jobs are reported as not confirmed rather than wrongly confirmed.
"""

from __future__ import annotations

from typing import Any

from app.core.errors import NotReplicated
from app.core.settings import Settings

RESENT = 2  # enqueue.lua: this run was accepted by an earlier try of the same call


def check(reply: list[Any], acked: int, job_ids: list[str], settings: Settings) -> None:
    """Raise NotReplicated when the accepted jobs are not confirmed on enough replicas."""
    accepted = [job_id for job_id, flag in zip(job_ids, reply, strict=True) if int(flag)]
    if not accepted:
        return
    wanted, timeout = settings.redis_wait_replicas, settings.redis_wait_timeout_ms
    what = f"job {accepted[0]}" if len(accepted) == 1 else f"{len(accepted)} jobs (first {accepted[0]})"
    if any(int(flag) == RESENT for flag in reply):
        why = "the connection broke and the enqueue was resent, so their replication cannot be confirmed"
    elif acked < wanted:
        why = (f"only {acked} of {wanted} replicas (REDIS_WAIT_REPLICAS) confirmed within {timeout} ms "
               "(REDIS_WAIT_TIMEOUT_MS)")
    else:
        return
    raise NotReplicated(
        f"{what} accepted by the master but not confirmed on its replicas: {why}; they run unless the master "
        "fails first: check the replicas (INFO replication) before enqueueing again", accepted)
