"""Dead letters on every engine: failed jobs are kept, listed, retried and purged (`app dead`)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest

from app.components.worker.api import WorkerClient
from app.components.worker.config import resolve
from app.components.worker.engines import engine_class
from app.components.worker.envelope import Envelope
from app.components.worker.events import read_events
from app.components.worker.metrics import queue_metrics
from app.components.worker.routing.dead import (
    NotDead,
    count_dead,
    list_dead,
    purge_dead,
    retry_all,
    retry_dead,
    trim_dead,
)
from app.components.worker.runtime.store import JobStore
from app.core.errors import AppError, JobFailed
from tests.conftest import ROOT, until

RESULT_TIMEOUT = 30
KEEP_RESULT = 120  # the contract queue's keep_result


async def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "app", *args], env=env, cwd=ROOT,
                                   capture_output=True, text=True, timeout=60)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, f"expected one line on stderr: {proc.stderr!r}"
    return lines[0]


async def types_of(client: WorkerClient, job_id: str) -> list[str]:
    return [e["type"] async for e in read_events(client.redis, client.keys, job_id=job_id)]


async def engine_dead_letters(client: WorkerClient, engine: str) -> int:
    """What the engine itself holds as failed or unacked: Dramatiq's XQ, TaskIQ's pending
    entries, arq's own result and in-progress keys. The runtime acks every message."""
    cfg = resolve(client.registry.queue("contract"), client.settings)
    adapter = engine_class(engine)(client.settings, client.keys, cfg)
    try:
        stats = await adapter.stats()
    finally:
        await adapter.close()
    held = stats.dead
    if engine == "dramatiq":
        held += await client.redis.zcard(f"{client.keys.engine_namespace('dramatiq')}:contract.XQ")
    if engine == "taskiq":
        held += stats.running
    if engine == "arq":
        ns = client.keys.engine_namespace("arq")
        held += len([k async for k in client.redis.scan_iter(match=f"{ns}:result:*")])
        held += len([k async for k in client.redis.scan_iter(match=f"{ns}:in-progress:*")])
    return held


@pytest.mark.parametrize("engine", ["arq", "dramatiq", "taskiq"])
async def test_failed_jobs_are_dead_listed_retried_and_purged(
    engine: str, client: WorkerClient, start_worker: Any, env: dict[str, str], tmp_path: Any,
) -> None:
    start_worker("contract", engine, worker_dead_ttl_seconds="3600")
    flag = tmp_path / "flag"
    comeback = await client.enqueue("fails_until_file", str(flag))
    doomed = [await client.enqueue("always_fails", f"reason {i}") for i in range(2)]
    permanent = await client.enqueue("permanent")
    ok = await client.enqueue("add", 1, 2)
    # A delivery of a job the layer has no record of ends failed by reject.lua: dead too.
    cfg = resolve(client.registry.queue("contract"), client.settings)
    adapter = engine_class(engine)(client.settings, client.keys, cfg)
    try:
        await adapter.send([("ghost.1", Envelope("ghost", "add", "contract", [1, 1], {}, 1, 0, "0").encode())])
    finally:
        await adapter.close()
    for job in (comeback, *doomed, permanent, client.job("ghost")):
        with pytest.raises(JobFailed):
            await job.result(RESULT_TIMEOUT)
    assert await ok.result(RESULT_TIMEOUT) == 3

    listed = await cli(env, "dead", "--json", "--queue", "contract")
    assert listed.returncode == 0, listed.stderr
    rows = {r["job_id"]: r for r in json.loads(listed.stdout)}
    assert set(rows) == {comeback.job_id, *(j.job_id for j in doomed), permanent.job_id, "ghost"}
    assert rows[comeback.job_id] | {"finished_at": 0} == {
        "job_id": comeback.job_id, "queue": "contract", "task": "fails_until_file", "error_type": "ValueError",
        "error": f"{flag} does not exist yet", "attempts": 3, "finished_at": 0, "engine": engine}
    assert (rows[permanent.job_id]["error_type"], rows[permanent.job_id]["attempts"]) == ("PermanentError", 1)
    assert (rows["ghost"]["error_type"], rows["ghost"]["attempts"]) == ("StaleDelivery", 0)
    for job_id in rows:  # the record and result of a dead job live as long as its entry, not keep_result
        for key in (client.keys.job(job_id), client.keys.result(job_id)):
            assert KEEP_RESULT < await client.redis.ttl(key) <= 3600
    (row,) = [r for r in await queue_metrics(client) if r["queue"] == "contract"]
    assert row["failed"] == 5  # `app queues` counts the dead set, on every engine
    table = await cli(env, "dead")
    assert table.returncode == 0 and comeback.job_id in table.stdout and "PermanentError" in table.stdout
    assert await until(lambda: _is_zero(engine_dead_letters(client, engine)), 10, "engine dead letters empty")

    flag.write_text("")
    retried = await cli(env, "dead", "retry", comeback.job_id)
    assert retried.returncode == 0 and retried.stdout.strip() == f"retried {comeback.job_id}", retried.stderr
    assert await comeback.result(RESULT_TIMEOUT) == "recovered"
    assert await client.redis.zscore(client.keys.dead("contract"), comeback.job_id) is None
    trail = await until(lambda: _ends(client, comeback.job_id, "job.completed"), 10, "retried job completed")
    assert trail.count("job.enqueued") == 2 and trail[-3:] == ["job.enqueued", "job.started", "job.completed"]

    no_message = await cli(env, "dead", "retry", "ghost")  # nothing stored to re-enqueue
    assert no_message.returncode == 2 and "cannot be retried" in one_line_error(no_message)
    before = {j.job_id: rows[j.job_id]["finished_at"] for j in (*doomed, permanent)}
    every = await cli(env, "dead", "retry", "--all", "--queue", "contract")
    assert every.returncode == 0 and every.stdout.strip() == "retried 3 dead job(s)", every.stderr
    for job_id in before:  # each ran again from try 1, failed again, and is dead again
        trail = await until(lambda j=job_id: _ends(client, j, "job.failed", enqueued=2), 20, f"{job_id} failed again")
        assert trail.count("job.started") == (2 if job_id == permanent.job_id else 6)
    again = {r["job_id"]: r for r in await list_dead(client.redis, client.keys, ["contract"])}
    assert set(again) == {*before, "ghost"}
    assert all(again[j]["finished_at"] > before[j] for j in before)

    purged = await cli(env, "dead", "purge", "--job", permanent.job_id)
    assert purged.returncode == 0 and purged.stdout.strip() == "purged 1 dead job(s)", purged.stderr
    assert not await client.redis.exists(client.keys.job(permanent.job_id), client.keys.result(permanent.job_id))
    purged = await cli(env, "dead", "purge", "--queue", "contract")
    assert purged.stdout.strip() == "purged 3 dead job(s)", purged.stderr
    assert json.loads((await cli(env, "dead", "--json")).stdout) == []
    assert await engine_dead_letters(client, engine) == 0


async def _is_zero(count: Any) -> bool:
    return await count == 0


async def _ends(client: WorkerClient, job_id: str, last: str, enqueued: int = 1) -> list[str] | None:
    types = await types_of(client, job_id)
    return types if types and types[-1] == last and types.count("job.enqueued") >= enqueued else None


async def _running(client: WorkerClient, store: JobStore, job_id: str, **options: Any) -> Envelope:
    """A job of the contract queue, claimed by a made-up instance (no worker needed)."""
    await client.enqueue("add", 1, 1, _job_id=job_id, _delay=3600, **options)
    raw = await client.redis.hget(client.keys.job(job_id), "envelope")
    await client.redis.zrem(client.keys.delayed("contract"), raw)
    env = Envelope.decode(raw)
    assert (await store.claim(env, "w", "w~1", "arq", f"w~1:{job_id}"))[0]
    return env


@pytest.mark.parametrize("engine", ["arq"])
async def test_entries_older_than_the_ttl_are_trimmed_and_cancelled_jobs_are_not_dead(
    engine: str, client: WorkerClient,
) -> None:
    keys, redis = client.keys, client.redis
    store = JobStore(redis, keys, 10_000, dead_ttl=60)  # an injected ttl; keep_result below is 5
    record = {"status": "failed", "error": "x", "error_type": "ValueError", "attempts": 1}
    for job_id in ("old", "new"):
        env = await _running(client, store, job_id)
        assert await store.finish(env, "w~1", 1, "failed", {**record, "job_id": job_id}, 5, [])
    assert 5 < await redis.ttl(keys.job("new")) <= 60 and 5 < await redis.ttl(keys.result("new")) <= 60
    # "old" failed 61 s ago as far as the dead set knows: the next failure trims it.
    now = int(await redis.zscore(keys.dead("contract"), "new"))
    await redis.zadd(keys.dead("contract"), {"old": now - 61_000})
    env = await _running(client, store, "next")
    assert await store.finish(env, "w~1", 1, "failed", {**record, "job_id": "next"}, 5, [])
    assert [m.decode() for m in await redis.zrange(keys.dead("contract"), 0, -1)] == ["new", "next"]
    # A quiet queue is trimmed by the readers (`app dead` passes WORKER_DEAD_TTL_SECONDS).
    await redis.zadd(keys.dead("contract"), {"new": now - 61_000})
    assert await count_dead(redis, keys, ["contract"], ttl=60) == 1
    assert await trim_dead(redis, keys, ["contract"], 60) == 0
    # Cancelled and completed jobs are not dead.
    for job_id, status in (("skipped", "cancelled"), ("done", "completed")):
        env = await _running(client, store, job_id)
        assert await store.finish(env, "w~1", 1, status, {"job_id": job_id, "status": status}, 5, [])
    assert [r["job_id"] for r in await list_dead(redis, keys, ["contract"])] == ["next"]
    assert await redis.ttl(keys.job("skipped")) <= 5


@pytest.mark.parametrize("engine", ["arq"])
async def test_python_api_paginates_refuses_and_purges(engine: str, client: WorkerClient) -> None:
    keys, redis = client.keys, client.redis
    store = JobStore(redis, keys, 10_000)
    for i in range(5):
        env = await _running(client, store, f"j{i}")
        assert await store.finish(env, "w~1", 1, "failed", {"job_id": f"j{i}", "attempts": 1}, 5, [])
    page = await list_dead(redis, keys, ["contract", "system"], limit=2, offset=1)
    assert [r["job_id"] for r in page] == ["j3", "j2"]  # most recent first
    assert await count_dead(redis, keys, ["contract"]) == 5
    with pytest.raises(NotDead, match="app dead"):
        await retry_dead(client, "never-failed")
    await client.enqueue("add", 1, 1, _job_id="j4")  # enqueued again under the same id: no longer dead
    assert [r["job_id"] for r in await list_dead(redis, keys, ["contract"])] == ["j3", "j2", "j1", "j0"]
    with pytest.raises(NotDead, match="enqueued again"):
        await retry_dead(client, "j4")
    assert await purge_dead(redis, keys, job_id="j4") == 1
    assert await redis.hget(keys.job("j4"), "status") == b"queued"  # a live record is never purged
    assert await purge_dead(redis, keys, "contract", "j4") == 0
    job = await retry_dead(client, "j0")  # no worker: accepted and waiting, out of the dead set
    assert await job.status() == "queued" and await count_dead(redis, keys, ["contract"]) == 3
    assert await retry_all(client, "contract") == 3
    assert await purge_dead(redis, keys) == 0  # every dead set of the prefix (SCAN): all retried
    env = await _running(client, store, "late")
    assert await store.finish(env, "w~1", 1, "failed", {"job_id": "late", "attempts": 1}, 5, [])
    assert await purge_dead(redis, keys) == 1
    assert not await redis.exists(keys.job("late"), keys.result("late"))
    with pytest.raises(AppError):
        await retry_dead(client, "")
    # A retry keeps the job's route: priority, target, tags.
    route = {"_priority": "high", "_worker_selector": {"gpu": "true", "zone": "b"}, "_tags": {"team": "a"}}
    await client.enqueue("add", 1, 1, _job_id="routed", _delay=3600, **route)  # routed: admission would claim it
    raw = await redis.hget(keys.job("routed"), "envelope")
    await redis.zrem(keys.delayed("contract"), raw)
    await redis.hset(keys.job("routed"), mapping={"status": "running", "owner": "w~1", "attempt": 1})
    env = Envelope.decode(raw)
    assert await store.finish(env, "w~1", 1, "failed", {"job_id": "routed", "attempts": 1}, 5, [])
    await retry_dead(client, "routed")
    again = Envelope.decode(await redis.hget(keys.job("routed"), "envelope"))
    assert (again.priority, again.selector, again.tags, again.try_) == ("high", "gpu=true,zone=b", {"team": "a"}, 1)
    assert again.run != env.run and await count_dead(redis, keys, ["contract"]) == 0


async def test_bad_inputs_are_one_line_and_non_zero(env: dict[str, str]) -> None:
    cases = [
        (("dead", "retry", "no-such-job"), 1, "is not dead"),
        (("dead", "retry"), 2, "JOB_ID"),
        (("dead", "retry", "x", "--all"), 2, "not both"),
        (("dead", "--queue", "nowhere"), 2, "unknown queue 'nowhere'"),
        (("dead", "purge", "--job", "no-such-job"), 1, "not in the dead set"),
    ]
    procs = await asyncio.gather(*(cli(env, *args) for args, _, _ in cases))
    for (args, code, needle), proc in zip(cases, procs, strict=True):
        assert proc.returncode == code, (args, proc.stderr)
        assert needle in one_line_error(proc), args
    empty = await cli(env, "dead")
    assert empty.returncode == 0 and empty.stdout.strip() == "no dead jobs"
    bad_ttl = await cli({**env, "WORKER_DEAD_TTL_SECONDS": "0"}, "dead")
    assert bad_ttl.returncode == 2 and "WORKER_DEAD_TTL_SECONDS='0' is invalid" in one_line_error(bad_ttl)
