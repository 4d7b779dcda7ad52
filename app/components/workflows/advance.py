"""One pass over one run: read what its units came to, decide what starts next, write it.

A pass runs while its caller holds the run's lock (see ``reconciler``). It reads the run
hash, the results of the units in flight (one pipelined round trip), decides, and writes
every change in one fenced script call (``commit.lua``): if the caller's lease lapsed
meanwhile, nothing is written and nothing is launched. Only after the commit are the new
units launched (jobs through the layer's enqueue, child runs through ``create.lua``), under
ids fixed by the commit, so:

- a crash between the commit and the launch leaves a unit recorded as in flight with no job
  record and no result: the next pass sees it ``lost`` and launches it again, same id;
- a launch repeated by two passes is refused by enqueue (the id is queued or running);
- a result can never be taken for another attempt's: each launch has its own id.

The cost of a pass does not grow with a parallel step's item count: counters in the step's
state, items read by range only when launched, outputs written per finished item.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.components.workflows.definition import Step, Workflow, order
from app.components.workflows.refs import Context, RefError, refs_in, resolve, text_of
from app.components.workflows.state import MAX_FAILS_KEPT, STEP_ENDED, Outcome, Unit, dump, load_state
from app.core.errors import AppError, ConfigError, UnknownQueue, UnknownTask

if TYPE_CHECKING:
    from app.components.workflows.advancer import Advancer

logger = logging.getLogger(__name__)

EVENT_FIELDS = ("queue", "backend", "job_id", "attempt", "worker_id")


class NotHere(Exception):
    """A pass this process cannot make (its code lacks a step's task): nothing is written."""


@dataclass
class Launch:
    unit: Unit
    task: str | None = None
    queue: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    workflow: str | None = None  # a child run of this workflow
    delay: float = 0.0
    timeout: float | None = None  # the step's timeout, which the job enforces on each attempt too
    max_tries: int | None = None  # 1 when the step has its own retry: then the step retries, not the task


class Commands:
    """Redis commands for ``commit.lua``, flattened as (word count, words...)."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.count = 0

    def add(self, *words: Any) -> None:
        self.words += [str(len(words)), *(str(w) for w in words)]
        self.count += 1


class Pass:
    """The decisions of one pass over one run (see the module docstring)."""

    def __init__(self, advancer: Advancer, run_id: str, meta: dict[str, str | None],
                 catalogue: dict[str, Workflow]) -> None:
        self.a = advancer
        self.fk = advancer.fk
        self.run_id = run_id
        self.meta = meta
        self.catalogue = catalogue
        self.wf = catalogue[meta["workflow"] or ""]
        self.params: dict[str, Any] = json.loads(meta["params"] or "{}")
        self.cancel = meta["cancel"] == "1"
        self.fatal = meta["fatal"] or ""
        self.status = meta["status"] or ""
        self.cmds = Commands()
        self.launches: list[Launch] = []
        self.relaunch: list[Launch] = []
        self.wake: list[str] = []
        self.states: dict[str, dict[str, Any]] = {}
        self.changed: set[str] = set()
        self.outputs: dict[str, Any] = {}
        self.now = 0
        self.inflight = 0
        self.to_cancel: list[Unit] = []
        self.new_items: dict[str, list[Any]] = {}  # items of steps started in this pass (not yet in Redis)

    # --- helpers ---------------------------------------------------------------------------

    def event(self, type_: str, error: str = "", duration_ms: Any = "") -> None:
        fields = ["type", type_, "ts", "$NOW", "task", self.wf.name, "error", error, "duration_ms", duration_ms,
                  "run_id", self.run_id, "workflow", self.wf.name, "parent", self.meta.get("parent") or ""]
        for name in EVENT_FIELDS:
            fields += [name, ""]
        self.cmds.add("XADD", self.a.keys.events, "MAXLEN", "~", self.a.events_maxlen, "*", *fields)

    def set_state(self, name: str, **values: Any) -> dict[str, Any]:
        st = self.states[name]
        st.update(values)
        self.changed.add(name)
        return st

    async def context(self, step: Step | None, item: Any = None) -> Context:
        """Params and the outputs ``step`` references (every step's for the run's output),
        read once per pass: a big output that a step does not name is never loaded."""
        if step is None:
            named = set(self.states)
        else:
            fields = [step.kwargs, step.params, step.parallel, step.run if isinstance(step.run, str) else None,
                      [p.condition for p in step.preconditions]]
            named = {r.name for r in refs_in(fields) if r.kind == "output"}
        need = [n for n in named if self.states[n]["st"] in ("completed", "failed") and n not in self.outputs]
        if need:
            raw = await self.a.redis.hmget(self.fk.run(self.run_id), *[f"o:{n}" for n in need])
            for name, value in zip(need, raw, strict=True):
                if value is not None:
                    self.outputs[name] = json.loads(value)
                elif self.states[name]["st"] == "failed":
                    self.outputs[name] = None  # a failed step (continue_on: failure) reads as null
        return Context(self.params, self.outputs, item)

    # --- the pass --------------------------------------------------------------------------

    async def run(self, raw_states: list[bytes | None], finished: set[str] | None = None) -> None:
        steps = self.wf.steps
        for s, raw in zip(steps, raw_states, strict=True):
            self.states[s.name] = load_state(raw)
        if self.status == "queued" and not await self.admit():
            return
        units = self.units_in_flight()
        # Read only the units the events said ended (when known), plus any with a timeout to check.
        read = units if finished is None else [
            u for u in units if u.id(self.run_id) in finished or self.wf.step(u.step).timeout is not None]
        self.now, outcomes = await self.a.read_units(self.run_id, read)
        for unit, outcome in zip(read, outcomes, strict=True):
            await self.apply(unit, outcome)
        if self.cancel and self.status == "running":
            self.status = "cancelling"
            self.cmds.add("HSET", self.fk.run(self.run_id), "status", "cancelling")
            self.to_cancel += units
        for _ in range(len(steps) + 1):
            if not await self.schedule():
                break
        self.inflight = sum(self.in_flight(st) for st in self.states.values()) + 0
        await self.maybe_end()
        run_key = self.fk.run(self.run_id)
        for name in sorted(self.changed):
            self.cmds.add("HSET", run_key, f"s:{name}", dump(self.states[name]))

    async def admit(self) -> bool:
        if self.cancel:
            self.status = "running"  # ends below as cancelled: nothing was launched
            return True
        limit = self.wf.max_active_runs
        if limit and not await self.a.admit(self.wf.name, self.run_id, limit):
            return False
        self.status = "running"
        self.cmds.add("HSET", self.fk.run(self.run_id), "status", "running", "started", "$NOW")
        self.event("workflow.started")
        return True

    def units_in_flight(self) -> list[Unit]:
        units = []
        for s in self.wf.steps:
            st = self.states[s.name]
            if st["st"] != "running":
                continue
            if "total" in st:
                units += [Unit(s.name, int(i), st["n"], a, t, s.run is not None) for i, (a, t) in st["fl"].items()]
            elif "a" in st:
                units.append(Unit(s.name, None, st["n"], st["a"], st["u0"], s.run is not None))
        return units

    @staticmethod
    def in_flight(st: dict[str, Any]) -> int:
        if st["st"] != "running":
            return 0
        return len(st["fl"]) if "total" in st else 1

    async def apply(self, unit: Unit, outcome: Outcome) -> None:
        step = self.wf.step(unit.step)
        if outcome.kind == "waiting":
            if step.timeout is not None and self.now - unit.launched > step.timeout * 1000:
                outcome = Outcome("failed", error=f"StepTimeout: step {step.name} did not finish within "
                                                  f"{step.timeout:g}s")
                self.to_cancel.append(unit)  # a job still waiting never starts; a child run stops
            else:
                return
        if outcome.kind == "lost":
            launch = await self.build(step, unit, await self.item_values(step, [unit.index]))
            if launch is not None:
                self.relaunch.append(launch)
            return
        if outcome.kind == "done":
            self.unit_done(step, unit, outcome.output)
        else:
            await self.unit_failed(step, unit, outcome.error)

    def unit_done(self, step: Step, unit: Unit, output: Any) -> None:
        st = self.states[step.name]
        if unit.index is None:
            self.set_state(step.name, st="completed", t1=self.now, err="")
            st.pop("a", None)
            self.outputs[step.name] = output
            self.cmds.add("HSET", self.fk.run(self.run_id), f"o:{step.name}", dump(output))
            return
        st["fl"].pop(str(unit.index), None)
        st["done"] += 1
        self.changed.add(step.name)
        self.cmds.add("HSET", self.fk.outputs(self.run_id, step.name), unit.index, dump(output))

    async def unit_failed(self, step: Step, unit: Unit, error: str, *, retry: bool = True) -> None:
        st = self.states[step.name]
        if retry and unit.attempt <= step.retry and not self.cancel and not self.fatal:
            again = Unit(unit.step, unit.index, unit.launch, unit.attempt + 1, self.now, unit.child)
            launch = await self.build(step, again, await self.item_values(step, [unit.index]))
            if launch is not None:
                launch.delay = step.retry_interval
                self.record_launch(step, again)
                self.launches.append(launch)
            return
        if unit.index is None:
            self.set_state(step.name, st="failed", t1=self.now, err=error)
            st.pop("a", None)
            self.outputs.pop(step.name, None)
            if not step.continue_on.failure:
                self.set_fatal(step.name, error)
            return
        st["fl"].pop(str(unit.index), None)
        st["nfail"] += 1
        if len(st["fails"]) < MAX_FAILS_KEPT:
            st["fails"].append(unit.index)
        st.setdefault("err", "")
        st["err"] = st["err"] or f"item {unit.index}: {error}"
        if not step.continue_on.failure:
            st["stop"] = True
        self.changed.add(step.name)

    def set_fatal(self, name: str, error: str) -> None:
        if not self.fatal:
            self.fatal = name
            self.cmds.add("HSET", self.fk.run(self.run_id), "fatal", name, "error", f"step {name} failed: {error}")

    def record_launch(self, step: Step, unit: Unit) -> None:
        st = self.states[step.name]
        if unit.index is None:
            self.set_state(step.name, a=unit.attempt, u0=unit.launched)
        else:
            st["fl"][str(unit.index)] = [unit.attempt, unit.launched]
            self.changed.add(step.name)

    async def item_values(self, step: Step, indexes: list[int | None]) -> dict[int, Any]:
        wanted = [i for i in indexes if i is not None]
        if not wanted:
            return {}
        if step.name in self.new_items:
            known = self.new_items[step.name]
            return {i: known[i] for i in wanted if i < len(known)}
        key = self.fk.items(self.run_id, step.name)
        low, high = min(wanted), max(wanted)
        if high - low < 4 * len(wanted) + 16:
            raw = await self.a.redis.lrange(key, low, high)
            return {i: json.loads(raw[i - low]) for i in wanted if i - low < len(raw)}
        async with self.a.redis.pipeline(transaction=False) as pipe:
            for i in wanted:
                pipe.lindex(key, i)
            values = await pipe.execute()
        return {i: json.loads(v) for i, v in zip(wanted, values, strict=True) if v is not None}

    async def build(self, step: Step, unit: Unit, items: dict[int, Any]) -> Launch | None:
        """What to launch for a unit; an argument that cannot be resolved or sent fails the
        unit at once (no retry: it would fail the same way) and returns None."""
        try:
            if unit.index is not None and unit.index not in items:
                raise RefError(f"item {unit.index} of step {step.name} is missing")
            ctx = await self.context(step, items.get(unit.index) if unit.index is not None else None)
            if step.run is not None:
                target = resolve(step.run, ctx) if isinstance(step.run, str) else step.run.name
                if not isinstance(target, str) or target not in self.catalogue:
                    known = ", ".join(sorted(self.catalogue))
                    raise RefError(f"run names unknown workflow {text_of(target)!r} (known: {known})")
                child = self.catalogue[target]
                params = {**child.params, **resolve(step.params, ctx)}
                return Launch(unit, workflow=target, kwargs=params)
            kwargs = resolve(step.kwargs, ctx)
            try:
                self.a.client._envelope(step.task, (), kwargs, step.queue, unit.id(self.run_id))  # type: ignore[arg-type]
            except (UnknownTask, UnknownQueue, ConfigError) as exc:
                # This process's code does not know the task (the run was validated where it
                # started): leave the run to a process that does, rather than fail the step.
                raise NotHere(f"step {step.name}: {exc}") from None
            return Launch(unit, task=step.task, queue=step.queue, kwargs=kwargs,  # type: ignore[arg-type]
                          timeout=step.timeout, max_tries=1 if step.retry else None)
        except (RefError, AppError) as exc:
            await self.unit_failed(step, unit, f"{type(exc).__name__}: {exc}", retry=False)
            return None

    async def schedule(self) -> bool:
        """Start what is ready and launch items; True when a step changed state (go again)."""
        changed = False
        stop = self.cancel or bool(self.fatal)
        limit = self.wf.max_active_steps
        inflight = sum(self.in_flight(st) for st in self.states.values())
        for step in order(self.wf):
            st = self.states[step.name]
            if st["st"] == "pending" and not stop:
                if limit and inflight >= limit and step.parallel is None:
                    continue
                started = await self.start(step)
                changed = changed or started
                if self.states[step.name]["st"] == "running" and step.parallel is None:
                    inflight += 1
            if st["st"] == "running" and "total" in st and not stop and not st.get("stop"):
                room = step.max_concurrent - len(st["fl"])
                if limit:
                    room = min(room, limit - inflight)
                picks: list[int] = []
                while room > 0 and (st["redo"] or st["next"] < st["total"]):
                    if st["redo"]:
                        picks.append(st["redo"].pop(0))
                    else:
                        picks.append(st["next"])
                        st["next"] += 1
                    room -= 1
                if picks:
                    self.changed.add(step.name)
                    items = await self.item_values(step, picks)
                    for index in picks:
                        unit = Unit(step.name, index, st["n"], 1, self.now, step.run is not None)
                        launch = await self.build(step, unit, items)
                        if launch is not None:
                            self.record_launch(step, unit)
                            self.launches.append(launch)
                            inflight += 1
            if st["st"] == "running" and "total" in st and not st["fl"]:
                if st.get("stop") or (not st["redo"] and st["next"] >= st["total"]) or stop:
                    await self.finish_parallel(step)
                    changed = True
            stop = self.cancel or bool(self.fatal)
        return changed

    async def start(self, step: Step) -> bool:
        """A pending step whose dependencies all ended: skip it, fail it, or start it."""
        deps = [self.states[d] for d in step.depends]
        if any(d["st"] not in STEP_ENDED for d in deps):
            return False
        for name in step.depends:
            dep, dst = self.wf.step(name), self.states[name]
            if dst["st"] == "skipped" and not dep.continue_on.skipped:
                self.set_state(step.name, st="skipped", t0=self.now, t1=self.now, why=f"{name} was skipped")
                return True
            if dst["st"] == "failed" and not dep.continue_on.failure:
                self.set_state(step.name, st="skipped", t0=self.now, t1=self.now, why=f"{name} failed")
                return True
        try:
            ctx = await self.context(step)
            for p in step.preconditions:
                value = text_of(resolve(p.condition, ctx))
                if not p.met(value):
                    self.set_state(step.name, st="skipped", t0=self.now, t1=self.now,
                                   why=f"precondition {p.condition} is {value!r}, expected {p.expected!r}")
                    return True
            items = None
            if step.parallel is not None and "total" not in self.states[step.name]:
                items = resolve(step.parallel, ctx) if isinstance(step.parallel, str) else step.parallel
                if not isinstance(items, list):
                    raise RefError(f"parallel {step.parallel!r} is {text_of(items)[:60]}, not a list")
        except RefError as exc:
            self.set_state(step.name, st="running", n=self.states[step.name]["n"] + 1, t0=self.now)
            await self.unit_failed(step, Unit(step.name, None, 0, 1, self.now, False), f"RefError: {exc}",
                                   retry=False)
            return True
        st = self.set_state(step.name, st="running", n=self.states[step.name]["n"] + 1, t0=self.now, err="")
        st.pop("t1", None)
        st.pop("why", None)
        if step.parallel is None:
            unit = Unit(step.name, None, st["n"], 1, self.now, step.run is not None)
            launch = await self.build(step, unit, {})
            if launch is not None:
                self.record_launch(step, unit)
                self.launches.append(launch)
            return True
        if items is not None:  # first start; a retried run keeps its items and counters
            st.update(total=len(items), next=0, done=0, nfail=0, fl={}, redo=[], fails=[], stop=False)
            self.new_items[step.name] = items
            key = self.fk.items(self.run_id, step.name)
            self.cmds.add("DEL", key)
            for start in range(0, len(items), 1000):
                self.cmds.add("RPUSH", key, *(dump(v) for v in items[start:start + 1000]))
        return True

    async def finish_parallel(self, step: Step) -> None:
        st = self.states[step.name]
        raw = await self.a.redis.hgetall(self.fk.outputs(self.run_id, step.name))
        pending = {int(k): v for k, v in self.pending_outputs(step.name).items()}
        got = {int(k): json.loads(v) for k, v in raw.items()}
        got.update(pending)
        output = [got.get(i) for i in range(st["total"])]
        failed = st["nfail"] > 0 or st.get("stop") or st["next"] < st["total"] or st["redo"]
        self.set_state(step.name, st="failed" if failed else "completed", t1=self.now)
        if failed and not st.get("err"):
            st["err"] = "cancelled" if self.cancel else "stopped: the run failed"
        self.outputs[step.name] = output
        self.cmds.add("HSET", self.fk.run(self.run_id), f"o:{step.name}", dump(output))
        if failed and not step.continue_on.failure and not self.cancel:
            self.set_fatal(step.name, st.get("err") or f"{st['nfail']} of {st['total']} items failed")

    def pending_outputs(self, step: str) -> dict[int, Any]:
        """Item outputs decided in this pass (written by the commit, not yet in Redis)."""
        key = self.fk.outputs(self.run_id, step)
        words, out, i = self.cmds.words, {}, 0
        while i < len(words):
            n = int(words[i])
            cmd = words[i + 1:i + 1 + n]
            if cmd[0] == "HSET" and cmd[1] == key:
                out[int(cmd[2])] = json.loads(cmd[3])
            i += n + 1
        return out

    async def maybe_end(self) -> None:
        if self.inflight or self.launches or self.relaunch:
            return
        ended = all(st["st"] in STEP_ENDED for st in self.states.values())
        if self.cancel:
            status, error = "cancelled", "cancelled"
        elif self.fatal:
            status, error = "failed", f"step {self.fatal} failed: {self.states[self.fatal].get('err', '')}"
        elif ended:
            status, error = "completed", ""
        else:
            return
        run_key = self.fk.run(self.run_id)
        fields: list[Any] = ["status", status, "finished", "$NOW", "error", error]
        if status == "completed":
            try:
                ctx = await self.context(None)
                output = resolve(self.wf.output, ctx) if self.wf.output is not None else {
                    n: self.outputs.get(n) for n, st in self.states.items() if st["st"] == "completed"}
                fields += ["output", dump(output)]
            except RefError as exc:
                status, error = "failed", f"output: {exc}"
                fields[1], fields[5] = status, error
        self.cmds.add("HSET", run_key, *fields)
        self.cmds.add("SREM", self.fk.active, self.run_id)
        self.cmds.add("SREM", self.fk.running(self.wf.name), self.run_id)
        keep = self.a.keep_seconds
        self.cmds.add("EXPIRE", run_key, keep)
        for s in self.wf.steps:
            if s.parallel is not None:
                self.cmds.add("EXPIRE", self.fk.items(self.run_id, s.name), keep)
                self.cmds.add("EXPIRE", self.fk.outputs(self.run_id, s.name), keep)
        started = int(self.meta.get("started") or self.now)
        self.event(f"workflow.{status}", error=error if status != "completed" else "",
                   duration_ms=max(0, self.now - started))
        self.status = status
        if self.meta.get("parent"):
            self.wake.append(self.meta["parent"] or "")
