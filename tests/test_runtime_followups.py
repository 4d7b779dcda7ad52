"""Runtime follow-ups: a stop never strands a delivery that is claiming its job.

- in this process (deterministic): a stop whose grace ends while a delivery's claim is on its
  way leaves the claim alone and hands the job back; a cancellation that lands during a claim
  (an engine's) hands the claimed job back before it goes on; a job running when the grace
  ends is interrupted and handed back for the same attempt;
- real workers (every engine): a stop with no grace while a burst is being delivered, then a
  fresh worker: every job ends with exactly one terminal event;
- the delayed mover does not poll: a delayed enqueue or a retry that becomes the earliest entry
  wakes it, it sleeps until the earliest due time it knows, and an idle mover makes no pass
  (its safety-net poll set far beyond the test).

Real Redis; no sleeps where an event can be awaited; every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from typing import Any

import pytest

from app.components.worker import JobRequest
from app.components.worker.api import Accepting, WorkerClient
from app.components.worker.config import resolve
from app.components.worker.envelope import Envelope
from app.components.worker.events import EventPublisher, EventPublishMiddleware, read_events
from app.components.worker.middleware import MiddlewareChain
from app.components.worker.runtime.context import WorkerContext
from app.components.worker.runtime.delayed import DelayedMover
from app.components.worker.runtime.store import JobStore
from app.components.worker.runtime.wrapper import JobRuntime
from tests.conftest import until

ENGINES = ["arq", "dramatiq", "taskiq"]
TERMINAL = ("job.completed", "job.failed")
TIMEOUT = 30
STRANDED_WAIT = 20  # below the delayed mover's 30 s lease: a job stranded under one fails, not slows, the test




class InProcess:
    """One JobRuntime of queue ``contract`` in this process, and jobs accepted for it whose
    messages the test hands to it (instead of an engine)."""

    def __init__(self, client: WorkerClient, engine: str) -> None:
        self.client = client
        spec = client.registry.queue("contract")
        self.publisher = EventPublisher(client.redis, client.keys, 10_000)
        self.worker = WorkerContext(queue="contract", engine=engine, worker_id="rt@1", instance="rt@1~x")
        self.runtime = JobRuntime(spec, resolve(spec, client.settings, processes=1),
                                  JobStore(client.redis, client.keys, 10_000),
                                  MiddlewareChain([EventPublishMiddleware(self.publisher)]), self.worker,
                                  self.publisher)
        self.engine = engine

    async def accept(self, job_id: str, task: str, *args: Any) -> str:
        """Accept a job as enqueue does (delayed far off, so no mover sends it) and return its
        message, as an engine would deliver it."""
        env, raw, _ = self.client._envelope(task, args, {}, None, job_id)
        assert await self.client._accept([Accepting(env, raw, 3_600_000, self.engine, True)]) == [1]
        await self.client.redis.zrem(self.client.keys.delayed("contract"), raw)
        return raw

    async def record(self, job_id: str) -> dict[str, str]:
        raw = await self.client.redis.hgetall(self.client.keys.job(job_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def waiting(self) -> list[Envelope]:
        return [Envelope.decode(raw) for raw in await self.client.redis.zrange(self.client.keys.delayed("contract"),
                                                                               0, -1)]

    async def close(self) -> None:
        await self.publisher.close()
        self.runtime.close()


@pytest.fixture
async def local(client: WorkerClient, engine: str) -> Any:
    rt = InProcess(client, engine)
    rt.publisher.start()
    yield rt
    await rt.close()


async def _in_claim(task: asyncio.Task[Any]) -> None:
    """Let the delivery run up to its claim: it then waits for the claim script's reply."""
    for _ in range(3):
        await asyncio.sleep(0)
    assert not task.done()


@pytest.mark.parametrize("engine", ["arq"])
async def test_a_stop_whose_grace_ends_during_a_claim_hands_the_job_back(engine: str, local: InProcess) -> None:
    """The bug: drain cancelled every unfinished delivery, one in its claim too; the claim
    script ran (job ``running``, owned by this instance) but the task never handed it back."""
    raw = await local.accept("claiming-at-stop", "add", 1, 2)
    delivery = asyncio.create_task(local.runtime.execute(raw))
    await _in_claim(delivery)
    local.runtime.stopping = True
    await asyncio.wait_for(local.runtime.drain(0), TIMEOUT)
    assert delivery.done() and delivery.exception() is None
    record = await local.record("claiming-at-stop")
    assert (record["status"], record["attempt"]) == ("delayed", "0"), record
    assert [(e.id, e.try_) for e in await local.waiting()] == [("claiming-at-stop", 1)]
    assert await local.client.redis.scard(local.client.keys.held(local.worker.instance)) == 0


@pytest.mark.parametrize("engine", ["arq"])
async def test_a_cancellation_during_a_claim_hands_the_claimed_job_back(engine: str, local: InProcess) -> None:
    """A cancellation that is not the drain's (an engine's, a process exit) may land while the
    claim script runs: the claim is waited for and the job given back before it goes on."""
    raw = await local.accept("cancelled-in-claim", "add", 1, 2)
    delivery = asyncio.create_task(local.runtime.execute(raw))
    await _in_claim(delivery)
    delivery.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(delivery, TIMEOUT)
    record = await local.record("cancelled-in-claim")
    assert (record["status"], record["attempt"]) == ("delayed", "0"), record
    assert [e.id for e in await local.waiting()] == ["cancelled-in-claim"]


@pytest.mark.parametrize("engine", ["arq"])
async def test_a_job_running_when_the_grace_ends_is_handed_back_for_the_same_attempt(
    engine: str, local: InProcess, tmp_path: Any,
) -> None:
    """Only a delivery running its job is interrupted; its attempt does not count."""
    raw = await local.accept("running-at-stop", "wait_for_file", str(tmp_path / "never"), 30.0)
    delivery = asyncio.create_task(local.runtime.execute(raw))

    async def running() -> bool:
        return (await local.record("running-at-stop")).get("status") == "running" and bool(
            local.runtime._running_job)

    await until(running, what="the job to run")
    local.runtime.stopping = True
    await asyncio.wait_for(local.runtime.drain(0.05), TIMEOUT)
    assert delivery.done() and delivery.exception() is None
    record = await local.record("running-at-stop")
    assert (record["status"], record["attempt"]) == ("delayed", "0"), record
    assert [e.id for e in await local.waiting()] == ["running-at-stop"]


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_stop_without_grace_mid_delivery_strands_no_job(
    engine: str, client: WorkerClient, start_worker: Any,
) -> None:
    """SIGTERM with ``WORKER_SHUTDOWN_TIMEOUT=0`` while a burst of short jobs is being
    delivered (deliveries claiming, running and handing back at the moment of the stop), then
    a fresh worker: every job ends with exactly one terminal event, promptly: nothing the stop
    gave back may wait for a lease or the offline threshold (the fresh worker's is 300 s, and
    the stopping mover's lease is 30 s, longer than the wait here)."""
    worker = start_worker("contract", engine, "--threads", "16", worker_shutdown_timeout="0")
    jobs = await client.enqueue_many([JobRequest("add", (i, 1)) for i in range(300)])
    ids = {j.job_id for j in jobs}

    async def some_done() -> bool:
        return len([e async for e in read_events(client.redis, client.keys, type_="job.completed")]) >= 20

    await until(some_done, what="the first jobs")
    assert worker.stop(signal.SIGTERM) == 0
    fresh = start_worker("contract", engine, "--threads", "16", worker_offline_after="300")

    async def terminal() -> Counter[str]:
        return Counter([e["job_id"] async for e in read_events(client.redis, client.keys) if e["type"] in TERMINAL])

    async def all_ended() -> bool:
        return ids <= set(await terminal())

    try:
        await until(all_ended, timeout=STRANDED_WAIT, what="a terminal event for every job")
    except AssertionError:
        missing = sorted(ids - set(await terminal()))
        states = [(m, await client.redis.hgetall(client.keys.job(m))) for m in missing[:3]]
        now_s, now_us = await client.redis.time()
        leased = [(Envelope.decode(raw).id, round(score - (now_s * 1000 + now_us // 1000)))
                  for raw, score in await client.redis.zrange(client.keys.delayed("contract"), 0, -1, withscores=True)]
        raise AssertionError(f"{len(missing)} jobs never ended: {states}; delayed entries (job, ms until due): "
                             f"{leased[:5]}") from None
    counts = await terminal()
    assert {job_id: n for job_id, n in counts.items() if n != 1} == {}
    assert {await j.status() for j in jobs} == {"completed"}
    assert fresh.stop() == 0


# The delayed mover ---------------------------------------------------------------------------


async def _handed_back(local: InProcess, job_id: str) -> None:
    """A job claimed by this runtime's instance and given back, as a stopping worker does with
    a delivery prefetched before its stop: due at once in the delayed set."""
    env = Envelope.decode(await local.accept(job_id, "add", 1, 1))
    assert await local.runtime.store.claim(env, "rt@1", "rt@1~x", local.engine, "rt@1~x:0") == (True, 1)
    assert await local.runtime.store.requeue(env, "rt@1~x", 1, record_attempt=0, delay_ms=0)


@pytest.mark.parametrize("engine", ["arq"])
async def test_a_stop_lets_the_movers_pass_end_so_nothing_it_took_stays_leased(engine: str, local: InProcess) -> None:
    """The bug: a stopping worker's hand-backs woke its own mover, which leased them (30 s)
    and was cancelled mid-send by the stop; nobody could move them until the lease ran out."""
    sending, release = asyncio.Event(), asyncio.Event()
    sent: list[str] = []

    async def send(messages: list[tuple[str, str]]) -> None:
        sent.extend(Envelope.decode(raw).id for _, raw in messages)
        sending.set()
        await release.wait()

    await _handed_back(local, "given-back")
    mover = DelayedMover(local.runtime.store, "contract", send, 3600.0)
    mover.start()
    await asyncio.wait_for(sending.wait(), TIMEOUT)
    stopping = asyncio.create_task(mover.stop())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not stopping.done(), "the stop did not wait for the pass under way"
    release.set()
    await asyncio.wait_for(stopping, TIMEOUT)
    assert sent == ["given-back"]
    assert await local.client.redis.zcard(local.client.keys.delayed("contract")) == 0


@pytest.mark.parametrize("engine", ["arq"])
async def test_a_pass_that_cannot_end_does_not_hold_the_stop(
    engine: str, local: InProcess, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pass stuck in its send (Redis gone) is cancelled after ``STOP_WAIT_S``: the stop ends,
    and the lease returns what it took (the crash path)."""
    from app.components.worker.runtime import delayed

    monkeypatch.setattr(delayed, "STOP_WAIT_S", 0.05)
    sending = asyncio.Event()

    async def send(messages: list[tuple[str, str]]) -> None:
        sending.set()
        await asyncio.Event().wait()

    await _handed_back(local, "stuck")
    mover = DelayedMover(local.runtime.store, "contract", send, 3600.0)
    mover.start()
    await asyncio.wait_for(sending.wait(), TIMEOUT)
    await asyncio.wait_for(mover.stop(), TIMEOUT)
    [(_, due)] = await local.client.redis.zrange(local.client.keys.delayed("contract"), 0, -1, withscores=True)
    now_s, now_us = await local.client.redis.time()
    assert due > now_s * 1000 + now_us // 1000  # leased: another mover sends it once the lease runs out


@pytest.mark.parametrize("engine", ["arq"])
async def test_a_wake_up_token_is_pushed_only_for_a_new_earliest_entry(engine: str, local: InProcess) -> None:
    """Idle movers sleep until the earliest due time they know of: only an entry that becomes
    the earliest needs to wake one (one token kept, expiring)."""
    redis, keys = local.client.redis, local.client.keys
    wake = keys.delayed_wake("contract")
    await local.client.enqueue("add", 1, 1, _delay=20)
    assert await redis.lrange(wake, 0, -1) == [b"1"]
    assert 0 < await redis.pttl(wake) <= 60_000
    await redis.delete(wake)
    await local.client.enqueue("add", 1, 2, _delay=30)  # later than the earliest: no token
    assert await redis.llen(wake) == 0
    await local.client.enqueue_many([JobRequest("add", (1, 3), delay=10), JobRequest("add", (1, 4), delay=5)])
    assert await redis.llen(wake) == 1  # earlier ones: a token, one kept
    await redis.delete(wake)
    # A retry (requeue.lua) due before everything waiting pushes one too.
    raw = await local.accept("retried", "add", 2, 2)
    env = Envelope.decode(raw)
    assert await local.runtime.store.claim(env, "rt@1", "rt@1~x", engine, "rt@1~x:0") == (True, 1)
    assert await local.runtime.store.requeue(env.next_try(1), "rt@1~x", 1, record_attempt=1, delay_ms=50)
    assert await redis.llen(wake) == 1


@pytest.mark.parametrize("engine", ["arq"])
async def test_an_idle_mover_waits_for_the_due_time_or_a_wake_up_not_a_poll(
    engine: str, local: InProcess, make_settings: Any,
) -> None:
    """With its safety-net poll at an hour, the mover still moves a 0.2 s delayed job, a retry
    due in 50 ms and an entry that was not the earliest when written, and makes no pass while
    idle."""
    import redis.asyncio as aioredis

    sent: list[str] = []

    async def send(messages: list[tuple[str, str]]) -> None:
        sent.extend(Envelope.decode(raw).id for _, raw in messages)

    store = local.runtime.store
    waiter = aioredis.Redis.from_url(local.client.settings.effective_redis_url)
    mover = DelayedMover(store, "contract", send, 3600.0, waiter=waiter, listen=2.0)
    mover.start()
    try:
        async def passes(n: int) -> bool:
            return mover.passes >= n

        await until(lambda: passes(1), what="the first pass")

        async def moved(*ids: str) -> bool:
            return set(ids) <= set(sent)

        await local.client.enqueue("add", 1, 2, _job_id="in-200ms", _delay=0.2)
        await until(lambda: moved("in-200ms"), 10, "the delayed job (woken by its token)")
        raw = await local.accept("retry-in-50ms", "add", 2, 2)
        env = Envelope.decode(raw)
        assert await store.claim(env, "rt@1", "rt@1~x", engine, "rt@1~x:0") == (True, 1)
        assert await store.requeue(env.next_try(1), "rt@1~x", 1, record_attempt=1, delay_ms=50)
        await until(lambda: moved("retry-in-50ms"), 10, "the retry (woken by its token)")
        # The earliest first, then one behind it that pushes no token: found by the timer.
        await local.client.enqueue("add", 1, 2, _job_id="first", _delay=0.3)
        await local.client.enqueue("add", 1, 2, _job_id="behind", _delay=0.6)
        await until(lambda: moved("first", "behind"), 10, "both delayed jobs")
        idle_from = mover.passes
        await asyncio.sleep(0.5)  # measuring that nothing happens
        assert mover.passes == idle_from, "an idle mover polled"
        assert mover.next_due is None
    finally:
        await mover.stop()
