"""Advances workflow runs; any number of them may run, in any process, and any may die.

Two ways a run gets advanced, both idempotent:

- events: a consumer group (``workflows``) on the layer's events stream. A ``job.completed``
  or ``job.failed`` of a step job (its id names the run, ``wf:<run>:<step>...``) or a
  ``workflow.*`` event of a child run (it names its parent) advances that run, and the entry
  is acked only after. Entries left pending by a consumer that died are claimed back with
  XAUTOCLAIM. While no run is active, the stream is not read at all.
- a sweep: every ``WORKFLOW_SWEEP_SECONDS`` one process (a lock) advances every active run,
  reading step results directly, so a trimmed stream or a crash never strands a run, and a
  step's timeout or a queued run's free slot is noticed.

Advancing a run is a pass under the run's lock (``enter.lua``/``leave.lua``): a caller that
finds it locked marks the run dirty and the holder goes again, so no wake-up is lost and two
processes never both start a step.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from redis.exceptions import ResponseError

from app.components.worker.api import WorkerClient
from app.components.workflows.advancer import Advancer
from app.components.workflows.keys import GROUP, FlowKeys
from app.components.workflows.scripts import script
from app.components.workflows.state import parse_job_id
from app.core.settings import Settings

logger = logging.getLogger(__name__)

LEASE_MS = 15_000
CLAIM_IDLE_MS = 30_000
BATCH = 500
SKIP_BACKLOG_MS = 60_000
FORGET_CONSUMER_MS = 3_600_000


class Runner:
    """Advances one run at a time, under its lock (what the CLI and the reconciler share)."""

    def __init__(self, client: WorkerClient, keep_seconds: int) -> None:
        self.client = client
        self.redis = client.redis
        self.fk = FlowKeys(client.keys)
        self.advancer = Advancer(client, keep_seconds)
        self.token = uuid.uuid4().hex
        self._enter = script(self.redis, "enter")
        self._leave = script(self.redis, "leave")
        self._busy: dict[str, bool] = {}  # runs this process is advancing now -> asked again meanwhile

    async def enter(self, run_id: str) -> bool:
        return bool(await self._enter(keys=[self.fk.lock(run_id), self.fk.dirty(run_id)],
                                      args=[self.token, LEASE_MS]))

    async def leave(self, run_id: str) -> int:
        return int(await self._leave(keys=[self.fk.lock(run_id), self.fk.dirty(run_id)], args=[self.token]))

    async def advance(self, run_id: str, finished: set[str] | None = None) -> None:
        """Advance a run (and the runs that pass wakes: children, a parent) until nothing is
        left to do; a run locked by another process is left to it (it goes again).

        ``finished``: the unit ids known to have ended (from events): the pass reads only
        those; None reads every unit in flight (the sweep, a wake-up of unknown cause)."""
        todo: list[tuple[str, set[str] | None]] = [(run_id, finished)]
        while todo:
            current, hint = todo.pop(0)
            if current in self._busy:  # a pass of this process is on it: it goes again, reading all
                self._busy[current] = True
                continue
            self._busy[current] = False
            try:
                for _ in range(100):  # a run that keeps getting dirty is left to the next wake-up
                    if not await self.enter(current):
                        break
                    try:
                        todo += [(w, None) for w in await self.advancer.run_pass(current, self.token, hint)]
                    finally:
                        again = await self.leave(current)
                    if again != 1 and not self._busy[current]:
                        break
                    self._busy[current], hint = False, None
            finally:
                del self._busy[current]


class Reconciler:
    """The background side: event consumer and sweep (see the module docstring)."""

    def __init__(self, settings: Settings, client: WorkerClient | None = None, *, consumer: str | None = None,
                 sweep_seconds: float | None = None, own_client: bool = False) -> None:
        from app.core.redis_cluster import WORKFLOWS, refuse_feature

        refuse_feature(settings, WORKFLOWS)
        self.settings = settings
        self.client = client or WorkerClient(settings)
        self._own_client = own_client or client is None
        self.runner = Runner(self.client, settings.workflow_keep_seconds)
        self.redis = self.client.redis
        self.keys = self.client.keys
        self.fk = FlowKeys(self.keys)
        self.consumer = consumer or f"reconciler-{uuid.uuid4().hex[:8]}"
        self.sweep_seconds = sweep_seconds or settings.workflow_sweep_seconds
        self._tasks: list[asyncio.Task[None]] = []
        self._active = asyncio.Event()
        self._stopping = False
        self.ticks = 0  # sweep-loop iterations so far (tests wait on it)

    def start(self) -> Reconciler:
        self._tasks = [asyncio.create_task(self._sweep_loop(), name="workflow-sweep"),
                       asyncio.create_task(self._consume_loop(), name="workflow-events")]
        return self

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.redis.xgroup_delconsumer(self.keys.events, GROUP, self.consumer)
        except Exception:  # noqa: BLE001 - Redis gone: the entry stays, and is forgotten an hour later
            pass
        if self._own_client:
            await self.client.close()

    async def _guarded(self, what: str, coro: Any) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one failing run or Redis hiccup must not stop the loop
            logger.warning("workflows: %s failed (%s: %s)", what, type(exc).__name__, exc)

    async def sweep(self) -> int:
        """Advance every active run once; returns how many there were."""
        runs = [r.decode() for r in await self.redis.smembers(self.fk.active)]
        for run_id in runs:
            await self._guarded(f"advancing run {run_id}", self.runner.advance(run_id))
        return len(runs)

    async def _sweep_loop(self) -> None:
        lease = max(100, int(self.sweep_seconds * 900))
        while True:
            try:
                active = await self.redis.scard(self.fk.active)
                if active:
                    self._active.set()
                    if await self.redis.set(self.fk.sweep, self.consumer, nx=True, px=lease):
                        await self.sweep()
                else:
                    self._active.clear()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                logger.warning("workflows: sweep failed (%s: %s)", type(exc).__name__, exc)
            self.ticks += 1
            await asyncio.sleep(self.sweep_seconds)

    async def _ensure_group(self) -> None:
        """The group exists, and does not start with a backlog: while no run was active nobody
        read the stream, and events older than ``SKIP_BACKLOG_MS`` behind the newest concern
        no run that the sweep would not advance anyway. A group read lately is left alone (other
        reconcilers are reading it)."""
        try:
            await self.redis.xgroup_create(self.keys.events, GROUP, id="$", mkstream=True)
            return
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        groups = await self.redis.xinfo_groups(self.keys.events)
        newest = await self.redis.xrevrange(self.keys.events, count=1)
        for group in groups:
            name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
            if name != GROUP or not newest:
                continue
            last = group["last-delivered-id"]
            last_ms = int((last.decode() if isinstance(last, bytes) else last).split("-")[0])
            newest_id = newest[0][0].decode() if isinstance(newest[0][0], bytes) else newest[0][0]
            newest_ms = int(newest_id.split("-")[0])
            if newest_ms - last_ms > SKIP_BACKLOG_MS:  # keep the last minute: a run just started is in it
                await self.redis.xgroup_setid(self.keys.events, GROUP, id=f"{newest_ms - SKIP_BACKLOG_MS}-0")

    async def _consume_loop(self) -> None:
        was_active = False
        since_claim = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not self._active.is_set():
                    was_active = False
                    # Idle: wait for a run to start (its token), or for the sweep to see one.
                    wait = min(self.sweep_seconds, self.settings.redis_socket_timeout / 2)
                    if not await self.redis.blpop([self.fk.wake], timeout=wait) and not self._active.is_set():
                        continue
                    self._active.set()
                if not was_active:
                    await self._ensure_group()
                    was_active = True
                if loop.time() - since_claim > CLAIM_IDLE_MS / 1000:
                    since_claim = loop.time()
                    await self._claim_abandoned()
                reply = await self.redis.xreadgroup(GROUP, self.consumer, {self.keys.events: ">"},
                                                    count=BATCH, block=1000)
                for _, entries in reply or []:
                    await self._handle(entries)
            except asyncio.CancelledError:
                raise
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    was_active = False
                    continue
                logger.warning("workflows: reading events failed (%s)", exc)
                await asyncio.sleep(1.0)
            except Exception as exc:  # noqa: BLE001
                logger.warning("workflows: reading events failed (%s: %s)", type(exc).__name__, exc)
                await asyncio.sleep(1.0)

    async def _claim_abandoned(self) -> None:
        """Entries a dead consumer read but never acked: handle them here. Consumers idle for
        an hour with nothing pending (worker processes that ended) are forgotten."""
        for consumer in await self.redis.xinfo_consumers(self.keys.events, GROUP):
            name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
            if not consumer["pending"] and consumer["idle"] > FORGET_CONSUMER_MS and name != self.consumer:
                await self.redis.xgroup_delconsumer(self.keys.events, GROUP, name)
        start = "0-0"
        for _ in range(100):
            reply = await self.redis.xautoclaim(self.keys.events, GROUP, self.consumer, CLAIM_IDLE_MS,
                                                start_id=start, count=BATCH)
            start, entries = reply[0], reply[1]
            if entries:
                await self._handle(entries)
            if start in (b"0-0", "0-0"):
                return

    async def _handle(self, entries: list[Any]) -> None:
        runs: dict[str, set[str]] = {}
        for _, fields in entries:
            if not fields:
                continue
            kind = fields.get(b"type", b"").decode()
            if kind in ("job.completed", "job.failed"):
                job_id = fields.get(b"job_id", b"").decode()
                found = parse_job_id(job_id)
                if found:
                    runs.setdefault(found[0], set()).add(job_id)
            elif kind.startswith("workflow."):
                parent = fields.get(b"parent", b"").decode()
                if parent:
                    runs.setdefault(parent, set()).add(fields.get(b"run_id", b"").decode())
        for run_id, finished in runs.items():
            await self._guarded(f"advancing run {run_id}", self.runner.advance(run_id, finished))
        ids = [entry_id for entry_id, _ in entries]
        if ids:
            await self.redis.xack(self.keys.events, GROUP, *ids)
