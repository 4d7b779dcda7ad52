"""Cancelling waiting jobs (`app dequeue`): never a silent drop, always a terminal event.

The waiting jobs of a queue are found in the queue's own structures: its delayed set and
the engines' keys of that queue (see ``engine_switch.waiting_pages``). The work is
proportional to what waits in that queue, never to every job the layer keeps; one job
(``--job``) costs a few commands whatever the backlog.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.components.worker import config as queue_config
from app.components.worker.engine_switch import BATCH, delete_messages, waiting_pages
from app.components.worker.envelope import Envelope, now_ms
from app.components.worker.routing.stats import next_ready, ready_sets
from app.components.worker.runtime import scripts
from app.core.settings import ENGINES

if TYPE_CHECKING:
    from app.components.worker.api import WorkerClient

REASON = "dequeued by operator"


def _id_of(raw: bytes | str) -> str | None:
    try:
        return Envelope.decode(raw).id
    except Exception:  # noqa: BLE001 - ValueError, RecursionError, UnicodeDecodeError: not one of ours
        return None


async def cancel_waiting(client: WorkerClient, queue: str, job_id: str | None = None) -> list[str]:
    """Cancel one job of ``queue``, or every job waiting on it; returns the cancelled ids.
    A cancelled job's message is also removed from the engine's keys when it is found there
    (otherwise the worker skips it at claim)."""
    script = client.redis.register_script(scripts.source("cancel"))
    await client.redis.script_load(scripts.source("cancel"))  # a pipeline (a cluster one too) cannot load it
    keep = queue_config.resolve(client.registry.queue(queue), client.settings).keep_result
    keys = client.queue(queue).keys  # the queue's slot on Redis Cluster
    cancelled: list[str] = []

    async def cancel(ids: list[str]) -> set[str]:
        async with client.redis.pipeline(transaction=False) as pipe:
            for jid in ids:
                names = [keys.job(jid), keys.delayed(queue), keys.result(jid), keys.events]
                pipe.execute_command(  # not script(client=pipe): a cluster pipeline refuses .evalsha()
                    "EVALSHA", script.sha, len(names), *names,
                    jid, now_ms(), keep, client.settings.worker_events_maxlen, REASON, keys.of_queue(queue, ""))
            replies = await pipe.execute()
        done = [jid for jid, flag in zip(ids, replies, strict=True) if int(flag)]
        cancelled.extend(done)
        return set(done)

    if job_id is not None:
        owner = await client.redis.hget(keys.job(job_id), "queue")
        if owner is not None and owner.decode() == queue:
            await cancel([job_id])
        return cancelled
    for key in await ready_sets(client.redis, keys, queue):  # routed jobs waiting for admission
        cursor = 0
        while True:
            cursor, members = await client.redis.zscan(key, cursor, count=BATCH)
            ids = list(dict.fromkeys(i for i in (_id_of(member) for member, _ in members) if i))
            if ids:
                await cancel(ids)
            await client.redis.zrem(key, *[m for m, _ in members]) if members else None  # stale entries too
            if int(cursor) == 0:
                break
    cursor = 0
    while True:  # delayed jobs: the cancel script removes them from the set
        cursor, members = await client.redis.zscan(keys.delayed(queue), cursor, count=BATCH)
        ids = list(dict.fromkeys(i for i in (_id_of(member) for member, _ in members) if i))
        if ids:
            await cancel(ids)
        if int(cursor) == 0:
            break
    for engine in ENGINES:  # what the engines hold (all three: a switch may have left some)
        async for page in waiting_pages(client.redis, keys, queue, engine):
            refs = [(ref, job_id) for ref, message in page if message is not None
                    if (job_id := _id_of(message[1])) is not None]
            if not refs:
                continue
            done = await cancel(list(dict.fromkeys(jid for _, jid in refs)))
            gone = [ref for ref, jid in refs if jid in done]
            if gone:
                await delete_messages(client.redis, keys, queue, engine, gone)
    return cancelled


async def cancel_next(client: WorkerClient, queue: str) -> str | None:
    """Cancel the job that would start next on ``queue`` (Dagu's dequeue): the first routed
    job by priority and order, else the head of the engine's queue. Delayed jobs are not
    next. Returns its id, or None when nothing waits. Reads a few entries, never the backlog."""
    keep = queue_config.resolve(client.registry.queue(queue), client.settings).keep_result
    script = client.redis.register_script(scripts.source("cancel"))
    keys = client.queue(queue).keys  # the queue's slot on Redis Cluster

    async def cancel(job_id: str) -> bool:
        flag = await script(
            keys=[keys.job(job_id), keys.delayed(queue), keys.result(job_id), keys.events],
            args=[job_id, now_ms(), keep, client.settings.worker_events_maxlen, REASON, keys.of_queue(queue, "")],
        )
        return bool(int(flag))

    for _ in range(BATCH):  # entries of jobs that ended meanwhile are dropped on the way
        head = await next_ready(client.redis, keys, queue)
        if head is None:
            break
        key, member = head
        job_id = _id_of(member)
        if job_id and await cancel(job_id):
            return job_id
        await client.redis.zrem(key, member)
    engine = client.engine_of(queue)
    async for page in waiting_pages(client.redis, keys, queue, engine):
        for ref, message in page:  # in the engine's order; a running job's message is passed over
            job_id = _id_of(message[1]) if message is not None else None
            if job_id and await cancel(job_id):
                await delete_messages(client.redis, keys, queue, engine, [ref])
                return job_id
    return None
