"""The I/O side of a pass: read a run and its units, commit the decisions, launch.

``Advancer.run_pass`` reads the run (one HMGET: its status and step states; the definition
once per process, cached: it never changes), lets a ``Pass`` decide (advance.py), writes the
decisions in one fenced script call (commit.lua), then launches what they started: step jobs
through the layer's ``enqueue_many`` (one script call per 1,000), child runs through
create.lua, and cancels what a cancelled run still has waiting.
"""

from __future__ import annotations

import json
import logging

from app.components.worker.api import JobRequest, WorkerClient
from app.components.workflows.advance import Launch, NotHere, Pass
from app.components.workflows.definition import Workflow, from_dict
from app.components.workflows.keys import FlowKeys
from app.components.workflows.state import RUN_ENDED, Outcome, Unit, dump

logger = logging.getLogger(__name__)


class Advancer:
    """Runs passes; holds nothing about a run between them but its (immutable) definition."""

    def __init__(self, client: WorkerClient, keep_seconds: int) -> None:
        self.client = client
        self.redis = client.redis
        self.keys = client.keys
        self.fk = FlowKeys(client.keys)
        self.events_maxlen = client.settings.worker_events_maxlen
        self.keep_seconds = keep_seconds
        self._definitions: dict[str, dict[str, Workflow]] = {}
        self._raw: dict[str, bytes | str] = {}
        self._names: dict[str, str] = {}
        from app.components.workflows.scripts import script

        self._commit = script(self.redis, "commit")
        self._admit = script(self.redis, "admit")
        self._create = script(self.redis, "create")

    def forget(self, run_id: str) -> None:
        self._definitions.pop(run_id, None)
        self._raw.pop(run_id, None)
        self._names.pop(run_id, None)

    async def admit(self, workflow: str, run_id: str, limit: int) -> bool:
        return bool(await self._admit(keys=[self.fk.running(workflow)], args=[run_id, limit]))

    def catalogue(self, run_id: str, raw: bytes | str) -> dict[str, Workflow]:
        cached = self._definitions.get(run_id)
        if cached is None:
            data = json.loads(raw)
            cached = {name: from_dict(d) for name, d in data["workflows"].items()}
            if len(self._definitions) > 10_000:
                self._definitions.clear()
                self._raw.clear()
                self._names.clear()
            self._definitions[run_id] = cached
            self._raw[run_id] = raw
        return cached

    async def read_units(self, run_id: str, units: list[Unit]) -> tuple[int, list[Outcome]]:
        """Redis's time (ms) and every unit's outcome, in one pipelined round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.time()
            for u in units:
                uid = u.id(run_id)
                if u.child:
                    pipe.hmget(self.fk.run(uid), "status", "output", "error")
                else:
                    pipe.get(self.keys.result(uid))
                    pipe.hget(self.keys.job(uid), "status")
            replies = await pipe.execute()
        sec, usec = replies[0]
        out, i = [], 1
        for u in units:
            if u.child:
                status, output, error = (v.decode() if isinstance(v, bytes) else v for v in replies[i])
                i += 1
                if status is None:
                    out.append(Outcome("lost"))
                elif status == "completed":
                    out.append(Outcome("done", json.loads(output) if output else None))
                elif status in RUN_ENDED:
                    out.append(Outcome("failed", error=f"child run {u.id(run_id)} {status}: {error or ''}"))
                else:
                    out.append(Outcome("waiting"))
                continue
            result, status = replies[i], replies[i + 1]
            i += 2
            if result is not None:
                record = json.loads(result)
                if record.get("status") == "completed":
                    out.append(Outcome("done", record.get("result")))
                else:
                    out.append(Outcome("failed", error=f"{record.get('error_type') or 'Error'}: {record.get('error') or ''}"))
            elif status is None:
                out.append(Outcome("lost"))
            else:
                out.append(Outcome("waiting"))
        return int(sec) * 1000 + int(usec) // 1000, out

    async def run_pass(self, run_id: str, token: str, finished: set[str] | None = None) -> list[str]:
        """One pass; returns the runs to advance next (children just created, a parent).
        ``finished``: unit ids known to have ended (None: read every unit in flight)."""
        key = self.fk.run(run_id)
        names = ("status", "params", "cancel", "fatal", "parent", "workflow", "started")
        known = self._definitions.get(run_id)
        wf_name = self._names.get(run_id)
        step_fields = [f"s:{s.name}" for s in known[wf_name].steps] if known and wf_name else []
        raw = await self.redis.hmget(key, *names, *(step_fields or ["def"]))
        meta = {n: (v.decode() if isinstance(v, bytes) else v) for n, v in zip(names, raw[:len(names)], strict=True)}
        if meta["status"] is None or meta["status"] in RUN_ENDED:
            await self.redis.srem(self.fk.active, run_id)
            self.forget(run_id)
            return []
        if step_fields:
            p = Pass(self, run_id, meta, known)  # type: ignore[arg-type]
            states = raw[len(names):]
        else:
            p = Pass(self, run_id, meta, self.catalogue(run_id, raw[len(names)]))
            self._names[run_id] = p.wf.name
            states = await self.redis.hmget(key, *[f"s:{s.name}" for s in p.wf.steps])
        try:
            await p.run(states, finished)
        except NotHere as exc:
            logger.warning("workflow run %s: left to another process: %s", run_id, exc)
            return []
        if not p.cmds.count and not p.relaunch:
            return []
        if not await self._commit(keys=[self.fk.lock(run_id)], args=[token, *p.cmds.words]):
            logger.warning("workflow run %s: lock lapsed during a pass; nothing written", run_id)
            return []
        await self.launch(run_id, p.launches + p.relaunch)
        if p.to_cancel:
            await self.cancel_units(run_id, p.to_cancel)
        wake = list(p.wake) + [u.unit.id(run_id) for u in p.launches + p.relaunch if u.workflow]
        wake += [u.id(run_id) for u in p.to_cancel if u.child]
        if p.status in RUN_ENDED:
            self.forget(run_id)
        return wake

    def job_timeout(self, launch: Launch) -> float | None:
        """The step's timeout as its job's own (a running job is stopped, not only the step
        failed), when the queue's workers can enforce it (not above its longest timeout)."""
        if launch.timeout is None or launch.task is None:
            return None
        try:
            longest = self.client.queue(launch.queue or self.client.registry.task(launch.task).queue).config.longest_timeout
        except Exception:  # noqa: BLE001 - an unknown task is reported by the pass itself
            return None
        return launch.timeout if launch.timeout <= longest else None

    async def launch(self, run_id: str, launches: list[Launch]) -> None:
        jobs = [JobRequest(la.task, kwargs=la.kwargs, queue=la.queue, job_id=la.unit.id(run_id),  # type: ignore[arg-type]
                           delay=la.delay or None, tags=self.tags(run_id, la.unit), timeout=self.job_timeout(la),
                           max_tries=la.max_tries)
                for la in launches if la.workflow is None]
        if jobs:
            await self.client.enqueue_many(jobs)  # a refused id is already queued or running: fine
        for la in launches:
            if la.workflow is not None:
                await self.create_child(run_id, la)

    @staticmethod
    def tags(run_id: str, unit: Unit) -> dict[str, str]:
        """On every event and the result of a step's job: which run, step and item it is."""
        tags = {"run_id": run_id, "step": unit.step}
        if unit.index is not None:
            tags["item"] = str(unit.index)
        return tags

    async def create_child(self, run_id: str, la: Launch) -> None:
        child_id = la.unit.id(run_id)
        raw = self._raw.get(run_id) or await self.redis.hget(self.fk.run(run_id), "def")
        await self._create(
            keys=[self.fk.run(child_id), self.fk.active, self.fk.runs],
            args=[child_id, "0", "workflow", la.workflow, "def", raw, "params", dump(la.kwargs),
                  "parent", run_id],
        )

    async def cancel_units(self, run_id: str, units: list[Unit]) -> None:
        """Cancel what a cancelled run has waiting: queued jobs never start, child runs stop."""
        from app.components.worker.dequeue import cancel_waiting

        for u in units:
            uid = u.id(run_id)
            if u.child:
                await self.redis.hset(self.fk.run(uid), "cancel", "1")
                continue
            queue = await self.redis.hget(self.keys.job(uid), "queue")
            if queue:
                try:
                    await cancel_waiting(self.client, queue.decode(), uid)
                except Exception as exc:  # noqa: BLE001 - best effort: a job that starts just finishes
                    logger.info("workflow run %s: could not cancel job %s (%s)", run_id, uid, exc)
