"""The operator's first hour (issue 12): every error one clear line, broken queue modules
isolated, producers that follow the workers' engine, a queue's engine switched without
stranding its waiting jobs, readable tables and events, dequeue without a scan of every job.

CLI tests run the real ``app`` as a subprocess with the test's environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import ROOT

ENGINES = ("arq", "dramatiq", "taskiq")


def app(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, f"expected one line on stderr, got: {proc.stderr!r}"
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    return lines[0]


# ---- 1. malformed settings and options ------------------------------------------------------

@pytest.mark.parametrize("url", ["notaurl", "http://localhost:6379", "redis://localhost:abc", "redis://:pw@h:99999"])
def test_malformed_redis_url_is_one_line(env: dict[str, str], url: str) -> None:
    line = one_line_error(app({**env, "REDIS_URL": url}, "queues"))
    assert "REDIS_URL=" in line and "redis://[user:password@]host[:port][/db]" in line
    assert "pw" not in line  # a password in the URL is never echoed


@pytest.mark.parametrize(("args", "needle"), [
    (("--delay", "inf"), "--delay: delay must be a finite number"),
    (("--delay", "1e400"), "--delay: delay must be a finite number"),
    (("--delay", "nan"), "--delay: delay must be a finite number"),
    (("--delay", "-5"), "--delay: delay must be 0 or more"),
    (("--delay", "1e300"), "--delay: delay must be at most"),
    (("--wait", "--timeout", "-1"), "--timeout: timeout must be more than 0"),
    (("--wait", "--timeout", "0"), "--timeout: timeout must be more than 0"),
    (("--wait", "--timeout", "nan"), "--timeout: timeout must be a finite number"),
    (("--job-id", "bad-\udcff"), "--job-id: job id must be valid text"),
    (("--kwargs", '{"x": ' + "[" * 30_000 + "]" * 30_000 + "}"), "--kwargs is nested too deep"),
    (("--", "x=" + "[" * 30_000), "argument 'x' is nested too deep"),
    (("--", "x=" + "[" * 500 + "]" * 500), "nested more than"),
])
def test_bad_enqueue_options_are_one_line(env: dict[str, str], args: tuple[str, ...], needle: str) -> None:
    line = one_line_error(app(env, "enqueue", "add", *args))
    assert needle in line


@pytest.mark.parametrize(("args", "needle"), [
    (("worker", "--processes", "abc"), "Invalid value for '--processes'"),
    (("enqueue",), "Missing argument 'task'"),
    (("nosuch",), "No such command 'nosuch'"),
    (("queues", "--bogus"), "No such option: --bogus"),
    (("loadtest", "--rate", "inf"), "--rate must be a finite number"),
])
def test_usage_errors_are_one_line(env: dict[str, str], args: tuple[str, ...], needle: str) -> None:
    line = one_line_error(app(env, *args))
    assert needle in line


def test_bad_result_and_dequeue_options_are_one_line(env: dict[str, str]) -> None:
    assert "--timeout" in one_line_error(app(env, "result", "x", "--wait", "--timeout", "inf"))
    assert "--job" in one_line_error(app(env, "dequeue", "contract", "--job", "a\x01b"))


# ---- 2. broken queue modules ----------------------------------------------------------------

BROKEN_MODULES = {
    "good.py": """
        def hello():
            return "hi"

        class WorkerSettings:
            functions = [hello]
            max_jobs = 2
    """,
    "syntax.py": "def oops(:\n",
    "imports.py": "import no_such_module_for_sure\n",
    "strings.py": """
        class WorkerSettings:
            functions = ["hello"]
    """,
    "typo.py": """
        def t():
            return 1

        class WorkerSettings:
            functions = [t]
            max_job = 20
    """,
}


@pytest.fixture
def broken_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    package = tmp_path / "opqueues"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, source in BROKEN_MODULES.items():
        (package / name).write_text(textwrap.dedent(source))
    return {**env, "PYTHONPATH": f"{tmp_path}:{ROOT}", "WORKER_QUEUE_PACKAGES": "opqueues"}


@pytest.mark.parametrize(("queue", "needle"), [
    ("syntax", "queue module opqueues.syntax cannot be imported: SyntaxError"),
    ("imports", "queue module opqueues.imports cannot be imported: ModuleNotFoundError: No module named "
                "'no_such_module_for_sure'"),
    ("strings", "opqueues.strings.WorkerSettings.functions[0] is 'hello' (str), not a function"),
    ("typo", "opqueues.typo.WorkerSettings.max_job is not a setting: did you mean 'max_jobs'?"),
])
def test_a_broken_queue_fails_only_its_own_commands(broken_env: dict[str, str], queue: str, needle: str) -> None:
    assert needle in one_line_error(app(broken_env, "worker", queue, "--backend", "arq"))
    assert needle in one_line_error(app(broken_env, "dequeue", queue))
    assert needle in one_line_error(app(broken_env, "health", queue))


def test_healthy_queues_keep_working_beside_broken_ones(broken_env: dict[str, str]) -> None:
    job = app(broken_env, "enqueue", "hello")
    assert job.returncode == 0, job.stderr
    listed = app(broken_env, "queues", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["queue"]: r for r in json.loads(listed.stdout)}
    assert "error" not in rows["good"] and rows["good"]["ready"] == 1
    assert set(rows) == {"good", "syntax", "imports", "strings", "typo"}
    assert "did you mean 'max_jobs'?" in rows["typo"]["error"]
    table = app(broken_env, "queues")  # piped: the error column is not cut at 80 columns
    assert table.returncode == 0
    assert "No module named 'no_such_module_for_sure'" in table.stdout
    unknown = one_line_error(app(broken_env, "enqueue", "nothing"))
    assert "unknown task 'nothing'" in unknown and "imports, strings, syntax, typo" in unknown


# ---- 3. engines: one per queue, producers follow, switching moves waiting jobs ------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_producers_follow_the_live_engine_and_a_second_engine_is_refused(
        env: dict[str, str], start_worker: Any, engine: str) -> None:
    start_worker("contract", engine)
    follow = app(env, "enqueue", "add", "--wait", "--timeout", "30", "--", "a=2", "b=40")
    assert follow.returncode == 0, follow.stderr
    assert json.loads(follow.stdout) == 42
    other = next(e for e in ENGINES if e != engine)
    mismatch = one_line_error(app({**env, "WORKER_BACKEND": other}, "enqueue", "add", "--", "a=1", "b=1"))
    assert f"served by {engine} workers" in mismatch and f"set to {other}" in mismatch
    refused = one_line_error(app(env, "worker", "contract", "--backend", other))
    assert f"served by live {engine} workers" in refused and f"a worker on {other}" in refused
    assert f"--backend {engine}" in refused
    supervised = one_line_error(app(env, "worker", "contract", "--backend", other, "--processes", "2"))
    assert f"served by live {engine} workers" in supervised


@pytest.mark.parametrize(("old", "new"), [("arq", "dramatiq"), ("dramatiq", "taskiq"), ("taskiq", "arq")])
def test_switching_engines_moves_waiting_jobs(env: dict[str, str], start_worker: Any, redis_url: str,
                                              prefix: str, old: str, new: str) -> None:
    ids = [app({**env, "WORKER_BACKEND": old}, "enqueue", "add", "--", f"a={i}", "b=1").stdout.strip()
           for i in range(3)]
    assert all(ids)
    rows = {r["queue"]: r for r in json.loads(app(env, "queues", "--json").stdout)}
    assert (rows["contract"]["engine"], rows["contract"]["ready"]) == (old, 3)  # where they wait, with no worker
    start_worker("contract", new)
    for i, job_id in enumerate(ids):
        done = app(env, "result", job_id, "--wait", "--timeout", "30")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == i + 1
    client = redis.Redis.from_url(redis_url)
    try:
        stream = [{k.decode(): v.decode() for k, v in fields.items()}
                  for _, fields in client.xrange(f"{prefix}:events")]
    finally:
        client.close()
    completed = [e for e in stream if e["type"] == "job.completed"]
    assert sorted(e["job_id"] for e in completed) == sorted(ids)
    assert {e["backend"] for e in completed} == {new}


# ---- 4. readable output, checked filters ------------------------------------------------------

def test_events_show_local_time_and_filters_are_checked(env: dict[str, str]) -> None:
    job_id = app(env, "enqueue", "add", "--delay", "60", "--", "a=1", "b=1").stdout.strip()
    table = app(env, "events", "--job", job_id)
    assert table.returncode == 0
    first = table.stdout.split()[0]
    assert first[:2] == "20" and "T" in first and first[10] == "T"  # ISO date and time
    raw = json.loads(app(env, "events", "--job", job_id, "--json").stdout.splitlines()[0])
    assert raw["ts"].isdigit()
    assert "unknown event type 'job.nope'" in one_line_error(app(env, "events", "--type", "job.nope"))
    assert "unknown queue 'nope'" in one_line_error(app(env, "events", "--queue", "nope"))
    assert "unknown queue 'nope'" in one_line_error(app(env, "workers", "--queue", "nope"))
    assert app(env, "events", "--type", "job", "--queue", "contract").returncode == 0


# ---- 5. dequeue reads the queue's own structures ------------------------------------------------

def test_dequeue_cancels_what_waits_in_every_engine_and_only_on_its_queue(env: dict[str, str]) -> None:
    waiting = [app({**env, "WORKER_BACKEND": e}, "enqueue", "add", "--", "a=1", "b=1").stdout.strip()
               for e in ENGINES]
    waiting.append(app(env, "enqueue", "add", "--delay", "600", "--", "a=1", "b=1").stdout.strip())
    elsewhere = app(env, "enqueue", "noop", "--queue", "load_test").stdout.strip()
    wrong_queue = app(env, "dequeue", "contract", "--job", elsewhere)
    assert wrong_queue.returncode == 1
    proc = app(env, "dequeue", "contract", "--all", "--json")
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads(proc.stdout)) == sorted(waiting)
    rows = {r["queue"]: r for r in json.loads(app(env, "queues", "--json").stdout)}
    assert rows["contract"]["ready"] == 0 and rows["contract"]["delayed"] == 0
    assert rows["load_test"]["ready"] == 1
    for job_id in waiting:
        assert "Cancelled: dequeued by operator" in one_line_error(app(env, "result", job_id), code=1)


async def test_jobs_written_to_the_old_engine_meanwhile_are_swept_over(make_settings: Any, start_worker: Any) -> None:
    """A producer that still believes no worker is live (its 2 s engine cache) writes into the
    default engine's keys: the live worker moves them over within seconds."""
    import time

    from app.components.worker.api import WorkerClient

    start_worker("contract", "dramatiq")
    client = WorkerClient(make_settings())  # nothing explicit: follows the live workers
    try:
        client._live["contract"] = {}  # as if it had looked before the worker started
        client._engine_checked["contract"] = time.monotonic() + 60
        assert client.engine_of("contract") == "arq"
        job = await client.enqueue("add", 20, 22)
        assert await job.result(timeout=20) == 42
    finally:
        await client.close()
