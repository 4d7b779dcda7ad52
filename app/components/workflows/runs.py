"""What application code and the CLI call: start, look at, cancel, retry and list runs.

    from app.components.workflows import Step, Workflow, Workflows

    flows = Workflows(client)                         # a WorkerClient
    run_id = await flows.start(wf, params={"DAY": "2024-01-02"})
    view = await flows.wait(run_id, timeout=60)        # the run, once it ended
    view["status"], view["output"], view["steps"]["extract"]["output"]

``start`` records the run and makes its first pass (the first steps are enqueued before it
returns); from then on the reconcilers of the workers advance it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any

from redis.exceptions import ResponseError

from app.components.worker.api import WorkerClient
from app.components.workflows.definition import RunNotFound, Workflow, WorkflowError, catalogue_to_dict, from_dict
from app.components.workflows.keys import GROUP, FlowKeys
from app.components.workflows.reconciler import Runner
from app.components.workflows.scripts import script
from app.components.workflows.state import RUN_ACTIVE, RUN_ENDED, child_run_id, dump, job_id, load_state
from app.core.errors import DuplicateJob, ResultTimeout

RUN_ID = re.compile(r"^[A-Za-z0-9_.@-]{1,200}$")


class DuplicateRun(DuplicateJob):
    """A caller-chosen run id that is queued or running."""


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class Workflows:
    def __init__(self, client: WorkerClient) -> None:
        from app.core.redis_cluster import WORKFLOWS, refuse_feature

        refuse_feature(client.settings, WORKFLOWS)
        self.client = client
        self.redis = client.redis
        self.fk = FlowKeys(client.keys)
        self.runner = Runner(client, client.settings.workflow_keep_seconds)
        self._create = script(self.redis, "create")

    async def start(self, wf: Workflow, params: dict[str, Any] | None = None, run_id: str | None = None) -> str:
        """Validate, record and start a run; returns its id. A ``run_id`` that is queued or
        running raises DuplicateRun; a finished one is replaced."""
        wf.validate(self.client.registry)
        params = dict(params or {})
        for key in params:
            if key not in wf.params:
                declared = ", ".join(sorted(wf.params)) or "none"
                raise WorkflowError(f"workflow {wf.name!r} has no param {key!r} (declared: {declared})")
        if run_id is not None and not RUN_ID.match(run_id):
            raise WorkflowError(f"run id {run_id!r} is invalid: use letters, digits, '_', '.', '@', '-' (200 at most)")
        run_id = run_id or uuid.uuid4().hex[:16]
        await self._ensure_group()
        old = await self.redis.hget(self.fk.run(run_id), "def")
        stale = [self.fk.lock(run_id), self.fk.dirty(run_id)]
        if old:
            for data in json.loads(old)["workflows"].values():
                stale += [k for s in data["steps"] for k in (self.fk.items(run_id, s["name"]),
                                                              self.fk.outputs(run_id, s["name"]))]
        created = await self._create(
            keys=[self.fk.run(run_id), self.fk.active, self.fk.runs, *stale],
            args=[run_id, "1", "workflow", wf.name, "def", dump(catalogue_to_dict(wf)),
                  "params", dump({**wf.params, **params}), "parent", ""],
        )
        if not created:
            raise DuplicateRun(f"workflow run {run_id!r} is already queued or running: not started again "
                               "(wait for it to end, cancel it, or choose another id)")
        await self.runner.advance(run_id)
        await self._wake()
        return run_id

    async def _ensure_group(self) -> None:
        """The events' consumer group exists before a run's first job can end, so a reconciler
        that starts reading now still sees that job's event."""
        try:
            await self.redis.xgroup_create(self.client.keys.events, GROUP, id="$", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _wake(self) -> None:
        """Wake an idle reconciler: it reads events from now on, not from its next sweep."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lpush(self.fk.wake, 1)
            pipe.ltrim(self.fk.wake, 0, 0)
            pipe.pexpire(self.fk.wake, 60_000)
            await pipe.execute()

    async def advance(self, run_id: str) -> None:
        await self.runner.advance(run_id)

    async def _exists(self, run_id: str) -> str:
        status = _text(await self.redis.hget(self.fk.run(run_id), "status"))
        if status is None:
            raise RunNotFound(f"no workflow run {run_id!r}: unknown id, or it ended and expired "
                              "(see `app workflow list`)")
        return status

    async def cancel(self, run_id: str) -> str:
        """Nothing of the run that has not started will start; running steps finish. Returns
        the status after the request (cancelling, cancelled, or the status it had ended with)."""
        status = await self._exists(run_id)
        if status in RUN_ENDED:
            return status
        await self.redis.hset(self.fk.run(run_id), "cancel", "1")
        await self.runner.advance(run_id)
        status = await self._exists(run_id)
        for _ in range(100):  # another process held the run: its next pass (it goes again) sees the request
            if status not in ("queued", "running"):
                break
            await asyncio.sleep(0.02)
            status = await self._exists(run_id)
        return status

    async def retry(self, run_id: str, timeout: float = 10.0) -> None:
        """Run a failed or cancelled run again from where it stopped: completed steps keep
        their outputs, failed steps (and a parallel step's failed items) run again, under new
        job ids."""
        status = await self._exists(run_id)
        if status not in ("failed", "cancelled"):
            raise WorkflowError(f"workflow run {run_id} is {status}: only a failed or cancelled run can be retried")
        runner = self.runner
        deadline = time.monotonic() + timeout
        while not await runner.enter(run_id):
            if time.monotonic() > deadline:
                raise WorkflowError(f"workflow run {run_id} is being advanced by another process: try again")
            await asyncio.sleep(0.05)
        try:
            key = self.fk.run(run_id)
            data = json.loads(await self.redis.hget(key, "def"))
            wf = from_dict(data["workflows"][_text(await self.redis.hget(key, "workflow"))])
            raw = await self.redis.hmget(key, "status", *[f"s:{s.name}" for s in wf.steps])
            if _text(raw[0]) not in ("failed", "cancelled"):
                raise WorkflowError(f"workflow run {run_id} is {_text(raw[0])}: only a failed or cancelled run "
                                    "can be retried")
            fields: list[Any] = ["status", "queued"]
            for s, value in zip(wf.steps, raw[1:], strict=True):
                st = load_state(value)
                if st["st"] != "failed" and not (st["st"] == "running"):
                    continue
                st["st"] = "pending"
                st["err"] = ""
                if "total" in st:
                    st["redo"] = sorted(set(st["redo"]) | set(st["fails"]) | {int(i) for i in st["fl"]})
                    st.update(nfail=0, fails=[], fl={}, stop=False)
                fields += [f"s:{s.name}", dump(st)]
            await self.redis.hdel(key, "cancel", "fatal", "error", "finished", "output")
            await self.redis.hset(key, mapping=dict(zip(fields[::2], fields[1::2], strict=True)))
            await self.redis.persist(key)
            await self.redis.sadd(self.fk.active, run_id)
        finally:
            await runner.leave(run_id)
        await self._ensure_group()
        await runner.advance(run_id)
        await self._wake()

    async def status(self, run_id: str) -> dict[str, Any]:
        """The run as a person (or the dashboard) reads it: status, params, output or error,
        and per step its state, attempt, timing, job or child run id, output or error."""
        raw = await self.redis.hgetall(self.fk.run(run_id))
        if not raw:
            raise RunNotFound(f"no workflow run {run_id!r}: unknown id, or it ended and expired "
                              "(see `app workflow list`)")
        h = {_text(k): _text(v) for k, v in raw.items()}
        data = json.loads(h["def"])
        wf = from_dict(data["workflows"][h["workflow"]])
        steps: dict[str, Any] = {}
        for s in wf.steps:
            st = load_state(h.get(f"s:{s.name}"))
            out = h.get(f"o:{s.name}")
            view: dict[str, Any] = {
                "state": st["st"], "attempt": st.get("n", 0), "depends": s.depends,
                "started": st.get("t0"), "finished": st.get("t1"),
                "duration_ms": (st["t1"] - st["t0"]) if st.get("t1") and st.get("t0") else None,
                "output": json.loads(out) if out is not None else None,
                "error": st.get("err") or None, "skipped_because": st.get("why"),
                "kind": "run" if s.run is not None else "task",
                "target": (s.run if isinstance(s.run, str) else None) if s.run is not None else s.task,
                "queue": s.queue,
            }
            if "total" in st:
                view["items"] = {"total": st["total"], "done": st["done"], "failed": st["nfail"],
                                 "running": len(st["fl"]), "waiting": st["total"] - st["next"] + len(st["redo"])}
            elif st.get("n"):
                make = child_run_id if s.run is not None else job_id
                view["unit"] = make(run_id, s.name, None, st["n"], st.get("a", 1))
            steps[s.name] = view
        return {
            "run_id": run_id, "workflow": h["workflow"], "status": h["status"],
            "params": json.loads(h.get("params") or "{}"), "parent": h.get("parent") or None,
            "created": int(h["created"]) if h.get("created") else None,
            "started": int(h["started"]) if h.get("started") else None,
            "finished": int(h["finished"]) if h.get("finished") else None,
            "output": json.loads(h["output"]) if h.get("output") else None,
            "error": h.get("error") or None, "steps": steps,
        }

    async def wait(self, run_id: str, timeout: float | None = None, drive: bool = False,
                   interval: float = 0.05) -> dict[str, Any]:
        """The run's view once it ended. ``drive``: advance it from here too (no worker needs
        to run a reconciler; e.g. ``app workflow run --wait``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.01
        while True:
            status = await self._exists(run_id)
            if status in RUN_ENDED:
                return await self.status(run_id)
            if deadline is not None and time.monotonic() > deadline:
                raise ResultTimeout(f"workflow run {run_id} did not end within {timeout:g}s (it is {status})")
            if drive:
                await self.runner.advance(run_id)
                for child in await self._children(run_id):
                    await self.runner.advance(child)
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, interval if not drive else 0.25)

    async def _children(self, run_id: str) -> list[str]:
        prefix = f"{run_id}."
        return [m.decode() for m in await self.redis.smembers(self.fk.active) if m.decode().startswith(prefix)]

    async def list(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest runs first (ended ones until they expire)."""
        ids = [i.decode() for i in await self.redis.zrevrange(self.fk.runs, 0, max(0, limit * 2))]
        out = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id in ids:
                pipe.hmget(self.fk.run(run_id), "workflow", "status", "created", "finished", "error", "parent")
            rows = await pipe.execute()
        gone = []
        for run_id, row in zip(ids, rows, strict=True):
            workflow, status, created, finished, error, parent = (_text(v) for v in row)
            if status is None:
                gone.append(run_id)
                continue
            out.append({"run_id": run_id, "workflow": workflow, "status": status,
                        "created": int(created) if created else None,
                        "finished": int(finished) if finished else None, "error": error or None,
                        "parent": parent or None})
        if gone:
            await self.redis.zrem(self.fk.runs, *gone)
        return out[:limit]


__all__ = ["RUN_ACTIVE", "DuplicateRun", "Workflows"]
