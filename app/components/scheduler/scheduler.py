"""The scheduler: passes over every schedule, enqueueing each due tick exactly once.

Run it anywhere, as often as you like (``app scheduler`` on several hosts, or inside
workers with ``--scheduler``): a pass reads each schedule's cursor and Redis's time, plans
(plan.py), and applies the plan with a compare-and-set on the cursor (claim.lua); only the
scheduler that applied it enqueues the ticks, with deterministic ids ``sched:<name>:<tick>``.
A scheduler that dies between claim and enqueue leaves the ticks leased in the pending set;
once the lease ends another scheduler enqueues those whose job record does not exist yet.

Time is Redis's (``TIME``) plus ``offset_ms``, which tests set to move the clock (three
hours of downtime, a DST night) without waiting; the host clock is never compared.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from app.components.scheduler.loader import Bound
from app.components.scheduler.plan import Plan, plan
from app.components.scheduler.store import FINISHED, ScheduleStore, State, job_id, manual_id
from app.components.worker.api import WorkerClient
from app.components.worker.health import default_worker_id
from app.core.errors import AppError, DuplicateJob, RedisUnavailable
from app.core.settings import Settings

logger = logging.getLogger(__name__)

MIN_SLEEP_S = 0.005
_ENQUEUE_TAKES_PRIORITY = "_priority" in inspect.signature(WorkerClient.enqueue).parameters


@dataclass
class PassReport:
    """What one pass did (for tests and logs)."""

    now: int = 0
    fired: list[str] = field(default_factory=list)  # job ids enqueued, in order
    recovered: list[str] = field(default_factory=list)
    missed: int = 0
    skipped: int = 0
    next_due: int | None = None  # earliest next tick over all running schedules (Redis ms + offset)


class Scheduler:
    def __init__(self, settings: Settings, schedules: list[Bound], *, client: WorkerClient | None = None,
                 offset_ms: int = 0, scheduler_id: str | None = None) -> None:
        self.settings = settings
        self.schedules = schedules
        self.by_name = {item.name: item for item in schedules}
        self.client = client or WorkerClient(settings)
        self._own_client = client is None
        self.store = ScheduleStore(self.client.redis, self.client.keys, settings.worker_events_maxlen,
                                   settings.worker_scheduler_lease_seconds)
        self.offset_ms = offset_ms
        self.id = scheduler_id or f"scheduler:{default_worker_id()}~{uuid.uuid4().hex[:6]}"
        self.poll = settings.worker_scheduler_poll_seconds
        self._task: asyncio.Task[None] | None = None
        self._warned: set[str] = set()
        self._next: dict[str, tuple[int, int]] = {}
        self._stop = asyncio.Event()

    # -- one pass ----------------------------------------------------------------------------

    async def tick_once(self) -> PassReport:
        real_now, states = await self.store.snapshot(self.schedules)
        now = real_now + self.offset_ms
        report = PassReport(now=now)
        for item in self.schedules:
            state = states[item.name]
            if state.pending_until is not None and state.pending_until <= real_now:
                report.recovered += await self._recover(item)
            cursor = state.cursor
            if cursor is None or self._first_after(item, cursor) <= now:
                cursor = await self._pass_one(item, state, now, report)
            if state.paused:
                continue
            nxt = now if cursor is None else self._first_after(item, cursor)
            report.next_due = nxt if report.next_due is None else min(report.next_due, nxt)
        if report.next_due is not None:
            report.next_due = max(report.next_due, now)  # a claim lost to another scheduler, a capped pass
        return report

    def _first_after(self, item: Bound, cursor: int) -> int:
        """The first tick after ``cursor``, cached per cursor: an idle pass costs no cron walk."""
        cached = self._next.get(item.name)
        if cached is None or cached[0] != cursor:
            cached = self._next[item.name] = (cursor, item.ticks.next_after(cursor))
        return cached[1]

    async def _pass_one(self, item: Bound, state: State, now: int, report: PassReport) -> int | None:
        """Plan and apply one schedule's pass; returns its cursor afterwards (as far as we know)."""
        previous_active = False
        if item.schedule.overlap == "skip" and state.last_job and state.cursor is not None:
            previous_active = (await self.store.job_status(state.last_job, item.queue)) not in FINISHED | {None}
        todo = plan(item.schedule, item.ticks, state.cursor, now, paused=state.paused, previous_active=previous_active)
        if todo is None:
            return state.cursor
        expected = "" if state.cursor is None else str(state.cursor)
        if not await self.store.claim(item, expected, todo, self.id):
            return state.cursor  # another scheduler applied this pass
        report.missed += todo.missed.count if todo.missed else 0
        report.skipped += todo.skipped.count if todo.skipped else 0
        if todo.missed:
            logger.warning("schedule %s: %d tick(s) missed (older than the catchup window)", item.name,
                           todo.missed.count)
        ids = [job_id(item.name, tick) for tick, _ in todo.fire]
        report.fired += await self._enqueue(item, ids)
        return todo.cursor

    async def _enqueue(self, item: Bound, ids: list[str]) -> list[str]:
        """Enqueue claimed ticks in order, then confirm them; on Redis trouble the rest stay
        leased (another pass, maybe another scheduler, takes them over after the lease)."""
        done: list[str] = []
        settled: list[str] = []
        try:
            for id_ in ids:
                try:
                    await self.client.enqueue(item.task, *item.schedule.args, _queue=item.queue, _job_id=id_,
                                              **self._options(item), **dict(item.schedule.kwargs))
                    done.append(id_)
                    logger.debug("schedule %s: enqueued %s", item.name, id_)
                except DuplicateJob:
                    logger.info("schedule %s: %s is already queued or running", item.name, id_)
                except (RedisUnavailable, RedisError):
                    raise
                except AppError as exc:  # cannot ever be enqueued as defined: say so, do not retry forever
                    logger.error("schedule %s: %s not enqueued: %s", item.name, id_, exc)
                except Exception:  # a producer middleware's bug: the same, with its traceback in the log
                    logger.exception("schedule %s: %s not enqueued", item.name, id_)
                settled.append(id_)
        except (RedisUnavailable, RedisError) as exc:
            logger.warning("schedule %s: Redis refused an enqueue (%s); %d tick(s) stay leased for a retry",
                           item.name, exc, len(ids) - len(settled))
        finally:
            try:
                await self.store.confirm(item, settled)
            except RedisError:
                pass  # their job records exist: a takeover only confirms them
        if done:
            logger.info("schedule %s: enqueued %s%s", item.name, done[0],
                        f" .. {done[-1]} ({len(done)} jobs)" if len(done) > 1 else "")
        return done

    def _options(self, item: Bound) -> dict[str, Any]:
        """``_priority`` only when the schedule sets one and enqueue takes it (else it would
        reach the task as an argument): warned once, the tick runs at normal priority."""
        if not item.schedule.priority:
            return {}
        if _ENQUEUE_TAKES_PRIORITY:
            return {"_priority": item.schedule.priority}
        if item.name not in self._warned:
            self._warned.add(item.name)
            logger.warning("schedule %s: priority=%s ignored: this version's enqueue has no _priority", item.name,
                           item.schedule.priority)
        return {}

    async def _recover(self, item: Bound) -> list[str]:
        """Take over ticks another scheduler claimed but did not confirm within its lease."""
        ids = await self.store.recover(item)
        todo = []
        for id_ in ids:
            if await self.store.job_exists(id_, item.queue):
                await self.store.confirm(item, [id_])
            else:
                todo.append(id_)
        if todo:
            logger.warning("schedule %s: taking over %d tick(s) whose enqueue was not confirmed", item.name, len(todo))
        return await self._enqueue(item, todo)

    # -- operator actions ----------------------------------------------------------------------

    async def trigger(self, name: str) -> str:
        """Enqueue one run now, with its own id ``sched:<name>:manual:<now>``."""
        item = self.by_name[name]
        now = await self.store.redis_now() + self.offset_ms
        manual = Plan(cursor=0, fire=[(now, "manual")])
        await self.store.claim(item, "*", manual, self.id)
        id_ = manual_id(item.name, now)
        await self._enqueue(item, [id_])
        return id_

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Pass, then sleep until the next tick (at most ``poll``), until ``stop`` is set."""
        stop = stop or self._stop
        delay = self.poll
        if self.schedules:
            logger.info("scheduler %s running %d schedule(s): %s", self.id, len(self.schedules),
                        ", ".join(item.name for item in self.schedules))
        else:
            logger.warning("scheduler %s has no schedules: declare WorkerSettings.schedules or set "
                           "WORKER_SCHEDULES_FILE", self.id)
        while not stop.is_set():
            try:
                report = await self.tick_once()
                delay = self.poll
                if report.next_due is not None:
                    delay = min(self.poll, max(MIN_SLEEP_S, (report.next_due - report.now) / 1000 + 0.002))
            except (AppError, RedisError) as exc:
                logger.warning("scheduler pass failed (%s); retrying in %gs", exc, self.poll)
                delay = self.poll
            except Exception:  # a bug must not end the schedules of a long-lived process
                logger.exception("scheduler pass failed; retrying in %gs", self.poll)
                delay = self.poll
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
        logger.info("scheduler %s stopped", self.id)

    def start(self) -> None:
        """Run in the background of the current event loop (inside a worker process)."""
        self._task = asyncio.create_task(self.run(self._stop), name="scheduler")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        await self.close()

    async def close(self) -> None:
        if self._own_client:
            await self.client.close()
