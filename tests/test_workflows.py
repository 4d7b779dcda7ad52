"""Workflows over real workers on all three engines, against a real Redis.

Three workers serve the module (``flows`` on arq, ``flows_b`` on Dramatiq, ``flows_c`` on
TaskIQ), each running the workflow reconciler; tests use their own run ids. The SIGKILL test
has its own queue (``flows_k``) and workers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from app.components.worker.api import WorkerClient
from app.components.workflows import DuplicateRun, Step, Workflow, WorkflowError, Workflows, load_file
from app.components.workflows.state import parse_job_id
from app.core.settings import load_settings
from tests.conftest import BASE_ENV, ROOT, WorkerProcess, until, wait_until

ENGINE_OF = {"flows": "arq", "flows_b": "dramatiq", "flows_c": "taskiq"}
TIMEOUT = 40


@pytest.fixture(scope="module")
def flows_env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "REDIS_", "WORKFLOW_"))}
    env.update(BASE_ENV)
    env.update({"REDIS_URL": redis_url, "WORKER_KEY_PREFIX": f"wf{uuid.uuid4().hex[:8]}", "PYTHONPATH": str(ROOT),
                "WORKFLOW_SWEEP_SECONDS": "0.5"})
    return env


def _start(queue: str, engine: str, env: dict[str, str], *extra: str) -> WorkerProcess:
    return WorkerProcess([queue, "--backend", engine, *extra], env)


def _wait_beats(env: dict[str, str], workers: list[tuple[str, WorkerProcess]]) -> None:
    import socket

    r = sync_redis.Redis.from_url(env["REDIS_URL"])
    try:
        for queue, w in workers:
            key = f"{env['WORKER_KEY_PREFIX']}:heartbeat:{queue}:{socket.gethostname()}@{w.proc.pid}"

            def beating(w: WorkerProcess = w, key: str = key) -> bool:
                assert w.proc.poll() is None, f"worker exited with {w.proc.returncode}"
                return bool(r.exists(key))

            wait_until(beating, 30, what=f"{queue} worker heartbeat")
    finally:
        r.close()


@pytest.fixture(scope="module")
def flow_workers(flows_env: dict[str, str]) -> Iterator[None]:
    workers = [(q, _start(q, e, flows_env)) for q, e in ENGINE_OF.items()]
    try:
        _wait_beats(flows_env, workers)
        yield
    finally:
        for _, w in workers:
            w.stop()


@pytest.fixture
async def flows(flows_env: dict[str, str], flow_workers: None) -> Any:
    values = {k.lower(): v for k, v in flows_env.items() if k.startswith(("WORKER_", "REDIS_", "WORKFLOW_"))}
    client = WorkerClient(load_settings(_env_file=None, **values))
    yield Workflows(client)
    await client.close()


async def events_of(flows: Workflows, run_id: str) -> list[dict[str, str]]:
    from app.components.worker.events import read_events

    out = []
    async for e in read_events(flows.redis, flows.client.keys):
        found = parse_job_id(e.get("job_id", ""))
        if (found and found[0] == run_id) or e.get("run_id") == run_id:
            out.append(e)
    return out


def fork_join_map_reduce(queue: str, n: int = 8, limit: int = 3) -> Workflow:
    """split -> (a, b, map over split's items) -> reduce(map) -> join(a, b, reduce)."""
    return Workflow("fan", params={"N": n}, steps=[
        Step("split", task="split", queue=queue, kwargs={"n": "${N}"}),
        Step("a", task="square", queue=queue, kwargs={"x": 3}, depends="split"),
        Step("b", task="square", queue=queue, kwargs={"x": "${split.output.count}"}, depends="split"),
        Step("map", task="square", queue=queue, kwargs={"x": "${ITEM}", "ms": 20}, depends="split",
             parallel="${split.output.items}", max_concurrent=limit),
        Step("reduce", task="total", queue=queue, kwargs={"values": "${map.output}"}, depends="map"),
        Step("join", task="join", queue=queue, depends=["a", "b", "reduce"],
             kwargs={"a": "${a.output}", "b": "${b.output}", "total": "${reduce.output}"}),
    ], output="${join.output}")


@pytest.mark.parametrize("queue", list(ENGINE_OF))
async def test_fork_join_and_map_reduce_with_max_concurrent(flows: Workflows, queue: str) -> None:
    run_id = await flows.start(fork_join_map_reduce(queue, n=8, limit=3), params={"N": 8})
    view = await flows.wait(run_id, TIMEOUT)
    assert view["status"] == "completed", (view["error"], {k: (s["state"], s["error"]) for k, s in view["steps"].items()})
    assert view["output"] == {"a": 9, "b": 64, "total": sum(i * i for i in range(1, 9))}
    assert view["steps"]["map"]["output"] == [i * i for i in range(1, 9)]
    assert view["steps"]["map"]["items"]["done"] == 8
    # max_concurrent from the events: items between their enqueue and their end, never over 3.
    events = [e for e in await events_of(flows, run_id) if e.get("job_id", "").startswith(f"wf:{run_id}:map:")]
    assert sum(e["type"] == "job.completed" for e in events) == 8
    assert 1 <= _peak(events, f"wf:{run_id}:map:") <= 3
    assert {e["backend"] for e in events if e["type"] == "job.started"} == {ENGINE_OF[queue]}
    assert all(e["tags"] == f"item={e['job_id'].rsplit(':', 1)[1]},run_id={run_id},step=map" for e in events)
    types = [e["type"] for e in await events_of(flows, run_id) if e.get("run_id") == run_id]
    assert types == ["workflow.started", "workflow.completed"]


async def test_a_run_mixes_queues_on_three_engines(flows: Workflows) -> None:
    wf = Workflow("mixed", steps=[
        Step("on_arq", task="where", queue="flows"),
        Step("on_dramatiq", task="where", queue="flows_b", depends="on_arq"),
        Step("on_taskiq", task="split", queue="flows_c", kwargs={"n": 3}, depends="on_arq"),
        Step("map", task="square", queue="flows_b", parallel="${on_taskiq.output.items}", kwargs={"x": "${ITEM}"},
             depends="on_taskiq"),
    ])
    view = await flows.wait(await flows.start(wf), TIMEOUT)
    assert view["status"] == "completed", (view["error"], {k: (s["state"], s["error"]) for k, s in view["steps"].items()})
    out = view["output"]
    assert (out["on_arq"]["engine"], out["on_dramatiq"]["engine"]) == ("arq", "dramatiq")
    assert out["map"] == [1, 4, 9]


async def test_failing_step_fails_the_run_unless_continue_on(flows: Workflows) -> None:
    failing = Workflow("failing", steps=[
        Step("ok", task="square", queue="flows_b", kwargs={"x": 2}),
        Step("bad", task="fail", queue="flows_c", kwargs={"message": "no good"}, depends="ok"),
        Step("after", task="square", queue="flows", kwargs={"x": 1}, depends="bad"),
    ])
    view = await flows.wait(await flows.start(failing), TIMEOUT)
    assert view["status"] == "failed"
    assert "step bad failed" in view["error"] and "no good" in view["error"]
    assert [view["steps"][s]["state"] for s in ("ok", "bad", "after")] == ["completed", "failed", "pending"]

    tolerant = Workflow("tolerant", steps=[
        Step("bad", task="fail", queue="flows", continue_on={"failure": True}),
        Step("after", task="square", queue="flows", kwargs={"x": 5}, depends="bad"),
        Step("items", task="fail", queue="flows_b", parallel=[1, 2], continue_on={"failure": True}),
        Step("reads", task="join", queue="flows_c", kwargs={"bad": "${bad.output}", "items": "${items.output}"},
             depends=["bad", "items"]),
    ])
    view = await flows.wait(await flows.start(tolerant), TIMEOUT)
    assert view["status"] == "completed", (view["error"], {k: (s["state"], s["error"]) for k, s in view["steps"].items()})
    assert view["steps"]["bad"]["state"] == "failed" and view["steps"]["after"]["output"] == 25
    assert view["steps"]["items"]["output"] == [None, None]
    assert view["steps"]["reads"]["output"] == {"bad": None, "items": [None, None]}


async def test_precondition_skips_a_step_and_its_dependents(flows: Workflows) -> None:
    wf = Workflow("gated", params={"MODE": "dry", "DAY": "2024-01-02"}, steps=[
        Step("check", task="split", queue="flows", kwargs={"n": 2}),
        Step("deploy", task="square", queue="flows", kwargs={"x": 2}, depends="check",
             preconditions=[{"condition": "${MODE}", "expected": "live"}]),
        Step("announce", task="square", queue="flows", kwargs={"x": 3}, depends="deploy"),
        Step("tolerant", task="square", queue="flows", kwargs={"x": 6}, depends="soft"),
        Step("soft", task="square", queue="flows", kwargs={"x": 4}, continue_on={"skipped": True},
             preconditions=[{"condition": "${DAY}", "expected": "re:^2023-"}]),
        Step("counted", task="square", queue="flows", kwargs={"x": 5}, depends="check",
             preconditions=[{"condition": "${check.output.count}", "expected": "re:^[0-9]+$"}]),
    ])
    view = await flows.wait(await flows.start(wf), TIMEOUT)
    assert view["status"] == "completed", (view["error"], {k: (s["state"], s["error"]) for k, s in view["steps"].items()})
    states = {name: s["state"] for name, s in view["steps"].items()}
    assert states == {"check": "completed", "deploy": "skipped", "announce": "skipped", "soft": "skipped",
                      "tolerant": "completed", "counted": "completed"}
    assert "expected 'live'" in view["steps"]["deploy"]["skipped_because"]
    assert view["steps"]["announce"]["skipped_because"] == "deploy was skipped"


async def test_nested_and_conditional_workflows_return_their_output(flows: Workflows) -> None:
    child = Workflow("child", params={"X": 0}, steps=[
        Step("sq", task="square", queue="flows_c", kwargs={"x": "${X}"}),
        Step("twice", task="total", queue="flows_b", kwargs={"values": ["${sq.output}", "${sq.output}"]},
             depends="sq"),
    ], output={"value": "${twice.output}"})
    other = Workflow("other", steps=[Step("one", task="square", queue="flows", kwargs={"x": 1})],
                     output="${one.output}")
    parent = Workflow("parent", workflows=[other], steps=[
        Step("pre", task="split", queue="flows", kwargs={"n": 3}),
        Step("sub", run=child, params={"X": "${pre.output.count}"}, depends="pre"),
        Step("pick", task="join", queue="flows", kwargs={"name": "other"}),
        Step("chosen", run="${pick.output.name}", depends="pick"),
        Step("fan", run=child, parallel=[1, 2], params={"X": "${ITEM}"}),
        Step("use", task="square", queue="flows", kwargs={"x": "${sub.output.value}"}, depends="sub"),
    ])
    run_id = await flows.start(parent)
    view = await flows.wait(run_id, TIMEOUT)
    assert view["status"] == "completed", (view["error"], {k: (s["state"], s["error"]) for k, s in view["steps"].items()})
    assert view["steps"]["sub"]["output"] == {"value": 18}
    assert view["steps"]["use"]["output"] == 324
    assert view["steps"]["chosen"]["output"] == 1
    assert view["steps"]["fan"]["output"] == [{"value": 2}, {"value": 8}]
    child_view = await flows.status(f"{run_id}.sub")
    assert child_view["parent"] == run_id and child_view["status"] == "completed"


async def test_retry_reruns_only_from_the_failed_step(flows: Workflows, tmp_path: Path) -> None:
    log, marker = tmp_path / "log", tmp_path / "marker"
    wf = Workflow("resumable", steps=[
        Step("first", task="append_line", queue="flows", kwargs={"path": str(log), "line": "first"}),
        Step("gate", task="fail_unless_file", queue="flows_b", kwargs={"path": str(marker)}, depends="first"),
        Step("items", task="fail_unless_file", queue="flows_c", parallel=[0, 1],
             kwargs={"path": f"{marker}" + "${ITEM}"}, depends="gate"),
        Step("last", task="append_line", queue="flows", kwargs={"path": str(log), "line": "last"},
             depends=["gate", "items"]),
    ])
    (tmp_path / "marker0").write_text("")
    run_id = await flows.start(wf, run_id=f"retry-{uuid.uuid4().hex[:6]}")
    view = await flows.wait(run_id, TIMEOUT)
    assert view["status"] == "failed"
    assert view["steps"]["first"]["state"] == "completed" and view["steps"]["gate"]["state"] == "failed"
    assert view["steps"]["items"]["state"] == "pending"
    marker.write_text("")
    await flows.retry(run_id)  # gate passes now; item 1 of items fails
    view = await flows.wait(run_id, TIMEOUT)
    assert view["status"] == "failed" and view["steps"]["items"]["items"]["done"] == 1
    assert view["steps"]["gate"]["state"] == "completed"
    (tmp_path / "marker1").write_text("")
    await flows.retry(run_id)  # only item 1 runs again
    view = await flows.wait(run_id, TIMEOUT)
    assert view["status"] == "completed", (view["error"], {k: (s["state"], s["error"]) for k, s in view["steps"].items()})
    assert log.read_text().splitlines() == ["first", "last"]
    assert view["steps"]["gate"]["attempt"] == 2 and view["steps"]["gate"]["unit"] == f"wf:{run_id}:gate@2.1"
    assert view["steps"]["first"]["unit"] == f"wf:{run_id}:first"
    assert view["steps"]["items"]["output"] == ["ok", "ok"]
    item_runs = [e["job_id"] for e in await events_of(flows, run_id) if e["type"] == "job.completed"
                 and e["job_id"].startswith(f"wf:{run_id}:items:")]
    assert sorted(item_runs) == [f"wf:{run_id}:items:0", f"wf:{run_id}:items:1@2.1"]  # item 0 ran once


def _peak(events: list[dict[str, str]], prefix: str, but: str = "") -> int:
    """Most jobs (ids starting with ``prefix``) between their enqueue and their end at once."""
    live, peak = 0, 0
    for e in events:
        if not e.get("job_id", "").startswith(prefix) or (but and but in e["job_id"]):
            continue
        live += {"job.enqueued": 1, "job.completed": -1, "job.failed": -1}.get(e["type"], 0)
        peak = max(peak, live)
    return peak


async def test_limits_step_retry_and_timeout(flows: Workflows, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    wf = Workflow("limited", max_active_runs=1, max_active_steps=2, steps=[
        Step("hold", task="hold_until_file", queue="flows", kwargs={"path": str(gate)}),
        *[Step(f"x{i}", task="square", queue="flows_b", kwargs={"x": i, "ms": 20}) for i in range(4)],
        Step("flaky", task="fails_before", queue="flows_c", kwargs={"path": str(tmp_path / "n"), "tries": 3},
             retry=2, retry_interval=0.05),
        Step("late", task="hold_until_file", queue="flows", kwargs={"path": str(tmp_path / "never"), "timeout": 3},
             timeout=0.3, continue_on={"failure": True}),
    ])
    first = await flows.start(wf)
    second = await flows.start(wf)
    assert (await flows.status(second))["status"] == "queued"  # max_active_runs=1
    gate.write_text("")
    view = await flows.wait(first, TIMEOUT)
    assert view["status"] == "completed", view
    assert view["steps"]["flaky"]["output"] == 3
    assert view["steps"]["late"]["state"] == "failed" and "StepTimeout" in view["steps"]["late"]["error"]
    assert (await flows.wait(second, TIMEOUT))["status"] == "completed"
    events = await events_of(flows, first)
    # max_active_steps=2 (a step that timed out no longer counts, though its job may run on)
    assert _peak(events, f"wf:{first}:", but=":late") <= 2
    flaky = [e["job_id"] for e in events if e["type"] == "job.enqueued" and ":flaky" in e["job_id"]]
    assert flaky == [f"wf:{first}:flaky", f"wf:{first}:flaky@1.2", f"wf:{first}:flaky@1.3"]
    ends = {e["run_id"]: e["id"] for e in await events_of(flows, first) + await events_of(flows, second)
            if e["type"] in ("workflow.started", "workflow.completed") and e["type"].endswith(
                "completed" if e["run_id"] == first else "started")}
    assert ends[first] < ends[second]  # the second run started after the first ended


async def test_a_crash_between_decision_and_enqueue_loses_nothing_and_passes_never_double(
    flows: Workflows, flows_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.components.workflows.reconciler import Runner

    wf = Workflow("idem", steps=[
        Step("one", task="square", queue="flows", kwargs={"x": 2}),
        Step("many", task="square", queue="flows_b", parallel=list(range(6)), max_concurrent=2,
             kwargs={"x": "${ITEM}", "ms": 10}, depends="one"),
    ])
    advancer = flows.runner.advancer

    async def crash(run_id: str, launches: list[Any]) -> None:
        raise ConnectionError("the process died here")

    monkeypatch.setattr(advancer, "launch", crash)
    with pytest.raises(ConnectionError):  # the first pass recorded step one as launched, then "died"
        await flows.start(wf, run_id=(run_id := f"idem-{uuid.uuid4().hex[:6]}"))
    monkeypatch.undo()
    # Many passes at once, from several "processes" (runners with their own tokens): each unit
    # is enqueued once; the lost launch of step one is made again (same id).
    runners = [Runner(flows.client, 60) for _ in range(4)]
    for _ in range(5):
        await asyncio.gather(*(r.advance(run_id) for r in runners))
    view = await flows.wait(run_id, TIMEOUT)
    assert view["status"] == "completed", view["error"]
    assert view["steps"]["many"]["output"] == [i * i for i in range(6)]
    enqueued = [e["job_id"] for e in await events_of(flows, run_id) if e["type"] == "job.enqueued"]
    assert sorted(enqueued) == sorted([f"wf:{run_id}:one"] + [f"wf:{run_id}:many:{i}" for i in range(6)])


async def test_cancel_starts_nothing_more(flows: Workflows, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    wf = Workflow("cancelled", steps=[
        Step("hold", task="hold_until_file", queue="flows", kwargs={"path": str(gate)}),
        Step("next", task="square", queue="flows", kwargs={"x": 2}, depends="hold"),
    ])
    run_id = await flows.start(wf, run_id=f"cancel-{uuid.uuid4().hex[:6]}")
    with pytest.raises(DuplicateRun):  # a chosen id is refused while its run is active
        await flows.start(wf, run_id=run_id)
    job = flows.client.job(f"wf:{run_id}:hold")
    for _ in range(400):
        if await job.status() == "running":
            break
        await asyncio.sleep(0.02)
    assert await flows.cancel(run_id) == "cancelling"
    gate.write_text("")
    view = await flows.wait(run_id, TIMEOUT)
    assert view["status"] == "cancelled"
    assert view["steps"]["hold"]["state"] == "completed" and view["steps"]["next"]["state"] == "pending"
    assert await flows.client.job(f"wf:{run_id}:next").status() == "unknown"


@pytest.mark.parametrize("engine", ["arq", "dramatiq", "taskiq"])
async def test_sigkill_of_the_worker_running_a_step_still_ends_the_run(
    flows: Workflows, flows_env: dict[str, str], tmp_path: Path, engine: str
) -> None:
    env = {**flows_env, "WORKER_OFFLINE_AFTER": "1.5"}
    workers = [("flows_k", _start("flows_k", engine, env)), ("flows_k", _start("flows_k", engine, env))]
    try:
        _wait_beats(env, workers)
        wf = Workflow("crash", steps=[
            Step("before", task="square", queue="flows", kwargs={"x": 2}),
            Step("victim", task="kill_once", queue="flows_k", kwargs={"marker": str(tmp_path / "killed")},
                 depends="before"),
            Step("after", task="square", queue="flows", kwargs={"x": "${before.output}"}, depends="victim"),
        ])
        view = await flows.wait(await flows.start(wf), 60)
        assert view["status"] == "completed", (view["error"], {k: (s["state"], s["error"]) for k, s in view["steps"].items()})
        assert view["steps"]["victim"]["output"] == "survived"
        assert view["steps"]["after"]["output"] == 16
        assert sum(w.proc.poll() == -signal.SIGKILL for _, w in workers) == 1
    finally:
        for _, w in workers:
            w.stop()


def _write(tmp_path: Path, text: str, name: str = "flow.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


YAML_ERRORS = {
    "steps:\n  - name: a\n    task: split\n    depend: b\n": "step 'a': unknown field 'depend' in a step (did you mean 'depends'?)",
    "steps:\n  - name: a\n    task: split\n    depends: zz\n": "step 'a': depends on unknown step 'zz'",
    "steps:\n  - {name: a, task: split, depends: b}\n  - {name: b, task: split, depends: a}\n": "depends on itself through a cycle",
    "steps:\n  - {name: a, task: split, kwargs: {n: '${b.output}'}}\n  - {name: b, task: split}\n": "step 'a': kwargs references ${b.output}, but a does not depend on step 'b'",
    "steps:\n  - {name: a, task: split, kwargs: {n: '${NOPE}'}}\n": "no param 'NOPE'",
    "steps:\n  - {name: a}\n": "step 'a': needs exactly one of task",
    "steps:\n  - {name: a, task: x, parallel: 3}\n": "step 'a': parallel must be a list",
    "steps:\n  - {name: a, task: x, preconditions: [{condition: x}]}\n": "step 'a': preconditions[0]",
    "steps:\n  - {name: a, task: x, continue_on: {failure: yes please}}\n": "continue_on: failure and skipped take true or false",
    "steps: [\n": "line 2: not valid YAML",
    "name: w\nstep: []\n": "unknown field 'step' in the workflow (did you mean 'steps'?)",
    "steps:\n  - {name: a, task: x, run: missing.yaml}\n": "missing.yaml: cannot read the workflow file",
}


def test_yaml_errors_are_one_line_naming_file_step_and_field(tmp_path: Path) -> None:
    for text, expected in YAML_ERRORS.items():
        path = _write(tmp_path, text)
        with pytest.raises(WorkflowError) as err:
            load_file(path)
        message = str(err.value)
        assert "\n" not in message and str(path.name) in message and expected in message, (text, message)


async def test_yaml_unknown_task_is_refused_at_start(flows: Workflows, tmp_path: Path) -> None:
    wf = load_file(_write(tmp_path, "name: t\nsteps:\n  - {name: a, task: no_such_task, queue: flows}\n"))
    with pytest.raises(WorkflowError, match="workflow 't', step 'a': unknown task 'no_such_task' in queue 'flows'"):
        await flows.start(wf)


def test_cli_runs_a_yaml_workflow_and_shows_it(flows_env: dict[str, str], flow_workers: None, tmp_path: Path) -> None:
    (tmp_path / "child.yaml").write_text(
        "name: child\nparams:\n  - X: 1\nsteps:\n  - {name: sq, task: square, queue: flows_b, kwargs: {x: '${X}'}}\n"
        "output: ${sq.output}\n")
    path = _write(tmp_path, """
name: etl
params:
  - N: 3
steps:
  - name: split
    task: split
    queue: flows
    kwargs: {n: "${N}"}
  - name: map
    task: square
    queue: flows_c
    depends: split
    parallel:
      items: ${split.output.items}
      max_concurrent: 2
    kwargs: {x: "${ITEM}"}
  - name: reduce
    task: total
    queue: flows
    depends: [map]
    kwargs: {values: "${map.output}"}
  - name: nested
    run: child.yaml
    depends: reduce
    params: {X: "${reduce.output}"}
output: ${nested.output}
""")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app", "workflow", *args], env=flows_env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    done = cli("run", str(path), "--wait", "--json", "--run-id", f"cli-{uuid.uuid4().hex[:6]}", "--", "N=4")
    assert done.returncode == 0, done.stderr
    import json

    view = json.loads(done.stdout)
    assert view["output"] == (1 + 4 + 9 + 16) ** 2
    shown = cli("status", view["run_id"])
    assert shown.returncode == 0 and "completed" in shown.stdout and "map" in shown.stdout
    listed = json.loads(cli("list", "--json").stdout)
    assert view["run_id"] in [r["run_id"] for r in listed]
    bad = cli("status", "no-such-run")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "no workflow run 'no-such-run'" in bad.stderr


async def test_entries_a_dead_reconciler_read_are_claimed_and_handled(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.components.workflows import reconciler as rec_module
    from app.components.workflows.keys import GROUP, FlowKeys

    client = WorkerClient(make_settings())
    r, events = client.redis, client.keys.events
    rec = None
    try:
        await r.xgroup_create(events, GROUP, id="0", mkstream=True)
        await r.xadd(events, {"type": "job.completed", "job_id": "wf:ghost:step"})
        await r.xreadgroup(GROUP, "dead-worker", {events: ">"}, count=10)  # read, never acked: then it died
        await r.sadd(FlowKeys(client.keys).active, "ghost")  # an active run makes the reconciler read events
        monkeypatch.setattr(rec_module, "CLAIM_IDLE_MS", 0)
        rec = rec_module.Reconciler(client.settings, client, consumer="alive", sweep_seconds=0.05).start()
        for _ in range(500):
            if (await r.xpending(events, GROUP))["pending"] == 0:
                break
            await asyncio.sleep(0.01)
        assert (await r.xpending(events, GROUP))["pending"] == 0
        assert not await r.sismember(FlowKeys(client.keys).active, "ghost")  # no such run: dropped
    finally:
        if rec is not None:
            await rec.stop()
        await client.close()


async def test_events_alone_advance_a_run_promptly(make_settings: Any, start_worker: Any) -> None:
    """The sweep is 60 s away: only the events (and the start's wake-up) can move this run."""
    from app.components.workflows import Reconciler

    start_worker("flows", "taskiq", workflow_reconciler="false")
    client = WorkerClient(make_settings())
    rec = Reconciler(client.settings, client, consumer="only", sweep_seconds=60).start()
    try:
        async def idle() -> bool:
            return rec.ticks >= 1

        await until(idle, 10, "the reconciler's first sweep (nothing active: it goes idle)")
        flows = Workflows(client)
        wf = Workflow("evented", steps=[
            Step("one", task="square", queue="flows", kwargs={"x": 3}),
            Step("two", task="square", queue="flows", kwargs={"x": "${one.output}"}, depends="one"),
            Step("map", task="square", queue="flows", parallel=[1, 2, 3], max_concurrent=1, kwargs={"x": "${ITEM}"},
                 depends="two"),
        ])
        view = await flows.wait(await flows.start(wf), 15)
        assert view["status"] == "completed" and view["steps"]["map"]["output"] == [1, 4, 9]
        assert view["finished"] - view["started"] < 10_000
    finally:
        await rec.stop()
        await client.close()
