"""Schedules: ticks, catchup, overlap, DST, exactly once per tick across schedulers, every engine.

Time is injected: the scheduler's now is Redis TIME plus an offset the test sets, and each
test calls ``tick_once`` directly; nothing waits through real minutes. The multi-scheduler
and per-engine tests run real processes on a 1-second schedule for a few seconds.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from app.components.scheduler import Schedule, ScheduleError, Scheduler, collect, read_file
from app.components.scheduler.loader import bind
from app.components.scheduler.plan import plan
from app.components.scheduler.store import job_id
from app.components.scheduler.ticks import Ticks
from app.components.worker.api import WorkerClient
from app.components.worker.events import read_events
from app.components.worker.registry import Registry
from tests.conftest import ROOT, until

BERLIN = ZoneInfo("Europe/Berlin")


def berlin_ms(*parts: int) -> int:
    return int(datetime(*parts, tzinfo=BERLIN).timestamp() * 1000)


def local(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, BERLIN).strftime("%H:%M%z")


@pytest.fixture
async def wclient(make_settings: Any) -> Any:
    c = WorkerClient(make_settings())
    yield c
    await c.close()


def scheduler_of(wclient: WorkerClient, *schedules: Schedule) -> Scheduler:
    items = [bind(s, wclient.registry, "test") for s in schedules]
    return Scheduler(wclient.settings, items, client=wclient)


async def at(sched: Scheduler, target_ms: int) -> Any:
    """One pass with the scheduler's clock set so that its now is ``target_ms``."""
    sched.offset_ms = target_ms - await sched.store.redis_now()
    return await sched.tick_once()


async def events_of(wclient: WorkerClient, family: str = "schedule") -> list[dict[str, str]]:
    return [e async for e in read_events(wclient.redis, wclient.keys, type_=family)]


# -- ticks and plans (no Redis) -------------------------------------------------------------------

def test_dst_policy_in_berlin_spring_forward_and_fall_back() -> None:
    daily = Ticks(Schedule("add", cron="30 2 * * *", tz="Europe/Berlin"))
    half = Ticks(Schedule("add", cron="*/30 * * * *", tz="Europe/Berlin"))
    spring = (berlin_ms(2026, 3, 29, 0, 0), berlin_ms(2026, 3, 29, 4, 0))
    fall = (berlin_ms(2026, 10, 25, 0, 0), berlin_ms(2026, 10, 25, 4, 0))  # 04:00 CET, 5 hours later
    # Skipped hour: 02:30 does not exist; it runs once, at the first valid time (03:00 CEST).
    assert [local(t) for t in daily.between(*spring, 10)] == ["03:00+0200"]
    assert [local(t) for t in half.between(*spring, 20)] == [
        "00:30+0100", "01:00+0100", "01:30+0100", "03:00+0200", "03:30+0200", "04:00+0200"]
    # Repeated hour: 02:30 exists twice; it fires once (the first occurrence, CEST).
    assert [local(t) for t in daily.between(*fall, 10)] == ["02:30+0200"]
    assert [local(t) for t in half.between(*fall, 20)] == [
        "00:30+0200", "01:00+0200", "01:30+0200", "02:00+0200", "02:30+0200", "03:00+0100", "03:30+0100", "04:00+0100"]
    # Interval schedules count elapsed time: DST does not change them.
    hourly = Ticks(Schedule("add", every=timedelta(hours=1), tz="Europe/Berlin"))
    assert len(hourly.between(*fall, 100)) == 5


def test_plan_overlap_policies_and_misfire_grace() -> None:
    every = Schedule("add", every=timedelta(seconds=10), misfire_grace=timedelta(seconds=25))
    ticks = Ticks(every)
    base = 1_000_000_000_000
    # A pass 60 s late: the ticks within the grace run (on time), older ones are missed.
    late = plan(every, ticks, base, base + 60_000)
    assert [t for t, _ in late.fire] == [base + 40_000, base + 50_000, base + 60_000]
    assert late.missed is not None and late.missed.count == 3
    latest = Schedule("add", every=timedelta(seconds=10), catchup_window=timedelta(minutes=5), overlap="latest")
    p = plan(latest, ticks, base, base + 60_000)
    assert [t for t, _ in p.fire] == [base + 60_000] and p.skipped.count == 5 and p.missed is None
    skip = Schedule("add", every=timedelta(seconds=10), overlap="skip")
    assert plan(skip, ticks, base, base + 10_000, previous_active=True).fire == []
    assert plan(skip, ticks, base, base + 10_000, previous_active=True).skipped.count == 1
    assert [t for t, _ in plan(skip, ticks, base, base + 10_000).fire] == [base + 10_000]
    assert plan(every, ticks, None, base).cursor == base  # first sight: nothing from the past fires
    assert plan(every, ticks, base, base + 5_000) is None


# -- the scheduler against Redis, with an injected clock ------------------------------------------

async def test_catchup_after_three_hour_pause_replays_the_window_in_order(wclient: WorkerClient) -> None:
    every = timedelta(seconds=2)
    window = timedelta(minutes=40)
    sched = scheduler_of(wclient, Schedule("add", every=every, kwargs={"a": 1, "b": 1}, name="catchup",
                                           catchup_window=window, misfire_grace=timedelta(seconds=1)))
    start = (await sched.store.redis_now()) // 2000 * 2000 + 500
    await at(sched, start)  # first sight
    first = await at(sched, start + 4_000)
    assert first.fired == [job_id("catchup", start - 500 + 2000), job_id("catchup", start - 500 + 4000)]
    # Three hours of downtime, then passes until nothing is left.
    resumed = start + 4_000 + 3 * 3600_000
    passes = [await at(sched, resumed)]
    while passes[-1].fired:
        passes.append(await at(sched, resumed + 200 * len(passes)))
    assert [len(p.fired) for p in passes[:2]] == [1000, 200] or [len(p.fired) for p in passes[:2]] == [1000, 201]
    fired = [i for p in passes for i in p.fired]
    tick_of = {job_id("catchup", t): t for t in range(start - 500, resumed + 10_000, 2000)}
    ticks = [tick_of[i] for i in fired]
    assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks)
    assert all(b - a == 2000 for a, b in zip(ticks, ticks[1:], strict=False))  # contiguous, in order
    assert ticks[0] == -(-(resumed - 40 * 60_000) // 2000) * 2000  # the oldest tick inside the window
    assert ticks[-1] >= resumed // 2000 * 2000
    missed = (ticks[0] - (start - 500 + 4000)) // 2000 - 1
    assert passes[0].missed == missed
    _, states = await sched.store.snapshot(sched.schedules)
    assert states["catchup"].missed == missed and states["catchup"].fired == 2 + len(fired)
    events = await events_of(wclient)
    assert [e["job_id"] for e in events if e["type"] == "schedule.fired"][2:] == fired
    [missed_event] = [e for e in events if e["type"] == "schedule.missed"]
    assert missed_event["count"] == str(missed) and missed_event["schedule"] == "catchup"
    enqueued = Counter([e["job_id"] async for e in read_events(wclient.redis, wclient.keys, type_="job.enqueued")])
    assert set(enqueued.values()) == {1} and len(enqueued) == 2 + len(fired)


async def test_dst_nights_fire_by_the_policy(wclient: WorkerClient) -> None:
    grace = timedelta(minutes=10)
    sched = scheduler_of(
        wclient,
        Schedule("add", cron="30 2 * * *", tz="Europe/Berlin", name="daily", misfire_grace=grace, kwargs={"a": 1, "b": 2}),
        Schedule("add", cron="*/30 * * * *", tz="Europe/Berlin", name="half", misfire_grace=grace, kwargs={"a": 1, "b": 2}),
    )
    nights = []
    for night in ((2026, 3, 29), (2026, 10, 25)):
        start = berlin_ms(*night, 1, 0) - 1000
        fired = []
        for step in range(0, 4 * 3600_000, 5 * 60_000):  # four real hours in 5-minute passes
            fired += (await at(sched, start + step)).fired
        nights.append(fired)

    def wall(ids: list[str], name: str) -> list[str]:
        prefix = f"sched:{name}:"
        return [local(int(datetime.fromisoformat(i.removeprefix(prefix).replace("Z", "+00:00")).timestamp() * 1000))
                for i in ids if i.startswith(prefix)]

    spring, fall = nights
    assert wall(spring, "daily") == ["03:00+0200"]  # 02:30 does not exist: once at the first valid time
    assert wall(spring, "half") == ["01:00+0100", "01:30+0100", "03:00+0200", "03:30+0200", "04:00+0200",
                                    "04:30+0200", "05:00+0200", "05:30+0200"]
    assert wall(fall, "daily") == ["02:30+0200"]  # 02:30 exists twice: it fires once
    assert wall(fall, "half") == ["01:00+0200", "01:30+0200", "02:00+0200", "02:30+0200", "03:00+0100",
                                  "03:30+0100"]
    assert all(len(set(n)) == len(n) for n in nights)


async def test_overlap_skip_waits_for_a_job_longer_than_the_period(
    wclient: WorkerClient, start_worker: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    sched = scheduler_of(wclient, Schedule("wait_for_file", every=timedelta(seconds=1), overlap="skip",
                                           kwargs={"path": str(gate)}, name="long"))
    start = (await sched.store.redis_now()) // 1000 * 1000 + 300
    await at(sched, start)
    first = await at(sched, start + 1000)
    assert len(first.fired) == 1
    start_worker("contract", "arq")
    job = wclient.job(first.fired[0])
    await until(lambda: _is(job, "running"), 20, "the long job to run")
    assert (await at(sched, start + 2000)).fired == []  # still running: skipped
    assert (await at(sched, start + 3000)).skipped == 1
    gate.write_text("go")
    await until(lambda: _is(job, "completed"), 20, "the long job to finish")
    after = await at(sched, start + 4000)
    assert after.fired == [job_id("long", start - 300 + 4000)]
    _, states = await sched.store.snapshot(sched.schedules)
    assert (states["long"].fired, states["long"].skipped) == (2, 2)
    skipped = [e for e in await events_of(wclient) if e["type"] == "schedule.skipped"]
    assert [(e["count"], e["reason"]) for e in skipped] == [("1", "overlap"), ("1", "overlap")]


async def _is(job: Any, status: str) -> bool:
    return await job.status() == status


async def test_pause_resume_trigger_and_a_lost_enqueue_taken_over(wclient: WorkerClient) -> None:
    sched = scheduler_of(wclient, Schedule("add", every=timedelta(seconds=1), kwargs={"a": 2, "b": 2}, name="p"))
    start = (await sched.store.redis_now()) // 1000 * 1000 + 300
    await at(sched, start)
    await sched.store.set_paused(sched.schedules[0], True)
    assert (await at(sched, start + 3000)).skipped == 3
    await sched.store.set_paused(sched.schedules[0], False)
    assert len((await at(sched, start + 4000)).fired) == 1  # no replay of the paused ticks
    manual = await sched.trigger("p")
    assert manual.startswith("sched:p:manual:") and await wclient.job(manual).status() == "queued"
    # A scheduler that claimed a tick and died before enqueueing it: another takes it over.
    other = Scheduler(wclient.settings.model_copy(update={"worker_scheduler_lease_seconds": 0.05}),
                      sched.schedules, client=wclient)
    _, states = await other.store.snapshot(sched.schedules)
    assert await other.store.claim(sched.schedules[0], str(states["p"].cursor), _one_tick(start + 5000 - 300), "dead")
    await until(lambda: _lease_over(other), 5, "the lease to end")
    report = await at(other, start + 5000)
    assert report.recovered == [job_id("p", start + 5000 - 300)]
    assert await wclient.job(report.recovered[0]).status() == "queued"


def _one_tick(tick: int) -> Any:
    from app.components.scheduler.plan import Plan

    return Plan(cursor=tick, fire=[(tick, "on-time")])


async def _lease_over(sched: Scheduler) -> bool:
    now, states = await sched.store.snapshot(sched.schedules)
    until_ = states[sched.schedules[0].name].pending_until
    return until_ is not None and until_ <= now


# -- real processes: two schedulers with one SIGKILLed, and one schedule per engine ---------------

def write_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "schedules.yaml"
    path.write_text(textwrap.dedent(body))
    return path


async def test_two_schedulers_one_killed_fire_each_tick_once(
    wclient: WorkerClient, env: dict[str, str], start_worker: Any, tmp_path: Path
) -> None:
    path = write_file(tmp_path, """
        schedules:
          - {name: beat, task: add, queue: contract, every: 1s, kwargs: {a: 1, b: 1}}
    """)
    start_worker("contract", "arq")
    env = {**env, "WORKER_SCHEDULER_LEASE_SECONDS": "1"}  # a kill between claim and enqueue: taken over in 1 s
    procs = [subprocess.Popen([sys.executable, "-m", "app", "scheduler", "--file", str(path)], env=env, cwd=ROOT)
             for _ in range(2)]
    try:
        async def fired(n: int) -> list[str] | None:
            ids = [e["job_id"] for e in await events_of(wclient) if e["type"] == "schedule.fired"]
            return ids if len(ids) >= n else None

        await until(lambda: fired(3), 20, "three ticks")
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        await until(lambda: fired(6), 20, "three more ticks after the kill")
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(20) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ids = await fired(6)
    assert len(ids) == len(set(ids))
    ticks = [datetime.fromisoformat(i.removeprefix("sched:beat:").replace("Z", "+00:00")).timestamp() for i in ids]
    assert all(b - a == 1 for a, b in zip(ticks, ticks[1:], strict=False)), ids  # one per second, none missing
    enqueued = Counter([e["job_id"] async for e in read_events(wclient.redis, wclient.keys, type_="job.enqueued")])
    assert set(enqueued) == set(ids) and set(enqueued.values()) == {1}
    for id_ in ids:
        assert await wclient.job(id_).result(20) == 2


@pytest.mark.parametrize("engine", ["arq", "dramatiq", "taskiq"])
async def test_a_schedule_runs_on_every_engine_inside_a_worker(
    engine: str, make_settings: Any, start_worker: Any, tmp_path: Path
) -> None:
    path = write_file(tmp_path, """
        schedules:
          - {name: on-engine, task: echo, queue: contract, every: 1s, kwargs: {n: 7}, overlap: skip}
    """)
    worker = start_worker("contract", engine, "--scheduler", worker_schedules_file=str(path))
    client = WorkerClient(make_settings(worker_backend=engine))
    try:
        async def first() -> str | None:  # its job.enqueued: schedule.fired comes just before the enqueue
            ids = [e["job_id"] async for e in read_events(client.redis, client.keys, type_="job.enqueued")]
            return ids[0] if ids else None

        id_ = await until(first, 20, "a tick")
        assert await client.job(id_).result(20) == {"args": [], "kwargs": {"n": 7}}
        record = await client.redis.hget(client.keys.job(id_), "engine")
        assert record.decode() == engine
    finally:
        await client.close()
    assert worker.stop() == 0


# -- definitions and the CLI ------------------------------------------------------------------------

def test_worker_settings_and_yaml_define_schedules(make_settings: Any, tmp_path: Path, monkeypatch: Any) -> None:
    package = tmp_path / "schedq"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "reports.py").write_text(textwrap.dedent("""
        from datetime import timedelta
        from app.components.worker import Schedule

        async def report(kind: str = "daily") -> str:
            return kind

        class WorkerSettings:
            functions = [report]
            schedules = [Schedule(report, cron="0 6 * * 1-5", tz="Europe/Berlin", kwargs={"kind": "weekday"},
                                  catchup_window=timedelta(hours=6), overlap="latest", priority="high")]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry.discover(["schedq", "tests.queues"])
    path = write_file(tmp_path, """
        schedules:
          - name: sweep
            task: add
            cron: "*/5 * * * *"
            kwargs: {a: 1, b: 2}
            catchup_window: 1h30m
    """)
    items = collect(registry, path)
    assert [(i.name, i.task, i.queue) for i in items] == [("report", "report", "reports"), ("sweep", "add", "contract")]
    assert items[0].schedule.priority == "high" and items[1].schedule.catchup_window == timedelta(minutes=90)
    with pytest.raises(ScheduleError, match="does not take these arguments"):
        collect(registry, write_file(tmp_path, "schedules: [{task: add, every: 5s, kwargs: {x: 1}}]"))
    with pytest.raises(ScheduleError, match="two schedules are named"):
        collect(registry, write_file(tmp_path, "schedules: [{task: add, every: 5s, kwargs: {a: 1, b: 1}}, "
                                               "{task: add, every: 9s, kwargs: {a: 1, b: 1}}]"))
    with pytest.raises(ScheduleError, match="overlap"):
        read_file(write_file(tmp_path, "schedules: [{task: add, every: 5s, overlap: never}]"))
    (package / "broken.py").write_text(textwrap.dedent("""
        from app.components.worker import Schedule

        async def nightly() -> None: ...

        class WorkerSettings:
            functions = [nightly]
            schedules = [Schedule(nightly, cron="0 25 * * *")]
    """))
    with pytest.raises(ScheduleError, match=r"schedq.broken cannot be imported: ScheduleError: .*'0 25 \* \* \*' is invalid"):
        collect(Registry.discover(["schedq"]))


def test_shipped_example_file_loads() -> None:
    items = collect(Registry.discover(["app.components.worker.queues"]), ROOT / "schedules.example.yaml")
    assert [(i.name, i.queue, i.schedule.overlap) for i in items] == [
        ("nightly-cleanup", "system", "skip"), ("health-probe", "system", "latest")]


def run_app(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(("body", "message"), [
    ("schedules: [{task: add, every: 5s\n", "is not valid YAML at line"),
    ("schedules: [{task: add, cron: '61 * * * *'}]", "cron '61 * * * *' is invalid"),
    ("schedules: [{task: no_such_task, every: 5s}]", "unknown task 'no_such_task'"),
    ("schedules: [{task: add, every: 5s, tz: Mars/Olympus}]", "time zone 'Mars/Olympus' is unknown"),
])
def test_bad_schedules_file_is_one_line_and_nonzero(env: dict[str, str], tmp_path: Path, body: str, message: str) -> None:
    path = write_file(tmp_path, body)
    proc = run_app({**env, "WORKER_SCHEDULES_FILE": str(path)}, "scheduler")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert message in lines[0] and str(path) in lines[0]


def test_schedules_cli_lists_pauses_resumes_and_triggers(env: dict[str, str], tmp_path: Path) -> None:
    path = write_file(tmp_path, """
        schedules:
          - {name: hourly, task: add, queue: contract, cron: "0 * * * *", kwargs: {a: 1, b: 2}, overlap: skip}
    """)
    env = {**env, "WORKER_SCHEDULES_FILE": str(path)}
    assert run_app(env, "schedules", "pause", "hourly").stdout.strip() == "schedule hourly paused"
    listed = run_app(env, "schedules", "--json")
    [row] = json.loads(listed.stdout)
    assert row["name"] == "hourly" and row["paused"] is True and row["next_run"] is None
    assert run_app(env, "schedules", "resume", "hourly").returncode == 0
    triggered = run_app(env, "schedules", "trigger", "hourly")
    assert triggered.returncode == 0 and triggered.stdout.startswith("sched:hourly:manual:")
    [row] = json.loads(run_app(env, "schedules", "--json").stdout)
    assert row["paused"] is False and row["next_run"] % 3600_000 == 0 and row["fired"] == 1
    assert row["last_job"] == triggered.stdout.strip() and row["last_outcome"] == "queued"
    events = [json.loads(line) for line in run_app(env, "events", "--type", "schedule", "--json").stdout.splitlines()]
    assert [(e["type"], e["schedule"], e["job_id"], e["reason"]) for e in events] == [
        ("schedule.fired", "hourly", row["last_job"], "manual")]
    unknown = run_app(env, "schedules", "pause", "nope")
    assert unknown.returncode == 2 and "unknown schedule 'nope'" in unknown.stderr
    table = run_app(env, "schedules")
    assert table.returncode == 0 and "hourly" in table.stdout
