"""The CLI as a person or a script meets it: exit codes, one-line errors, JSON on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import ROOT


def app(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {proc.stderr!r}"
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_help_lists_commands(env: dict[str, str]) -> None:
    proc = app(env, "--help")
    assert proc.returncode == 0
    for command in ("worker", "enqueue", "result", "dequeue", "queues", "workers", "events", "health", "loadtest",
                    "dev"):
        assert command in proc.stdout


def test_enqueue_wait_prints_result_json_and_exit_codes(env: dict[str, str], start_worker: Any) -> None:
    start_worker("contract", "arq")
    ok = app(env, "enqueue", "add", "--wait", "--timeout", "30", "--", "a=2", "b=40")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == 42
    typed = app(env, "enqueue", "echo", "--wait", "--kwargs", '{"x": {"y": 1}}', "--", "n=10", "flag=true",
                "items=[1,2]", "name=plain text")
    assert json.loads(typed.stdout) == {"args": [], "kwargs": {"x": {"y": 1}, "n": 10, "flag": True,
                                                                 "items": [1, 2], "name": "plain text"}}
    failed = app(env, "enqueue", "permanent", "--wait", "--timeout", "30")
    assert failed.returncode == 1
    assert "PermanentError: cannot work" in one_line_error(failed)
    job_id = app(env, "enqueue", "add", "--", "a=1", "b=1").stdout.strip()
    done = app(env, "result", job_id, "--wait", "--timeout", "30")
    assert done.returncode == 0 and json.loads(done.stdout) == 2


def test_result_of_unknown_id_exits_1(env: dict[str, str]) -> None:
    proc = app(env, "result", "no-such-job")
    assert proc.returncode == 1
    assert "unknown id" in one_line_error(proc)


@pytest.mark.parametrize(
    ("args", "env_extra", "needle"),
    [
        (("enqueue", "no_such_task"), {}, "unknown task 'no_such_task'"),
        (("enqueue", "add", "--kwargs", "{not json"), {}, "--kwargs is not valid JSON"),
        (("enqueue", "add", "--", "novalue"), {}, "not key=value"),
        (("enqueue", "add", "--", "a=1", "b=2"), {"REDIS_URL": "redis://127.0.0.1:1"}, "cannot reach Redis"),
        (("worker", "system"), {"WORKER_PROCESSES": "abc"}, "WORKER_PROCESSES='abc' is invalid"),
        (("worker", "system"), {"WORKER_BACKEND": "celery"}, "WORKER_BACKEND='celery' is invalid"),
        (("worker", "system", "--backend", "celery"), {}, "--backend 'celery' is invalid"),
        (("worker", "nowhere"), {}, "unknown queue 'nowhere'"),
        (("enqueue", "add"), {"WORKER_BACKEND_CONTRACT": "rq"}, "WORKER_BACKEND_CONTRACT='rq' is invalid"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(env: dict[str, str], args: tuple[str, ...], env_extra: dict[str, str],
                                          needle: str) -> None:
    proc = app({**env, **env_extra}, *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert needle in one_line_error(proc)


def test_wrong_password_is_one_line(env: dict[str, str], redis_url: str) -> None:
    from app.core.redis_server import RedisServer

    with RedisServer(password="s3cret") as server:
        proc = app({**env, "REDIS_URL": f"redis://:wrong@127.0.0.1:{server.port}"}, "enqueue", "add", "--", "a=1", "b=1")
        assert proc.returncode == 2
        assert "refused the credentials" in one_line_error(proc)
        proc = app({**env, "REDIS_URL": f"redis://127.0.0.1:{server.port}", "REDIS_PASSWORD": "s3cret"},
                   "queues", "--json")
        assert proc.returncode == 0, proc.stderr


def test_duplicate_job_id_exits_1(env: dict[str, str]) -> None:
    first = app(env, "enqueue", "add", "--job-id", "dup", "--", "a=1", "b=1")
    assert first.returncode == 0 and first.stdout.strip() == "dup"
    second = app(env, "enqueue", "add", "--job-id", "dup", "--", "a=1", "b=1")
    assert second.returncode == 1
    assert "already queued or running" in one_line_error(second)


def test_dequeue_cancels_waiting_jobs_with_a_terminal_event(env: dict[str, str]) -> None:
    job_id = app(env, "enqueue", "add", "--delay", "60", "--", "a=1", "b=1").stdout.strip()
    proc = app(env, "dequeue", "contract", "--job", job_id, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == [job_id]
    result = app(env, "result", job_id)
    assert result.returncode == 1 and "Cancelled: dequeued by operator" in result.stderr
    events = app(env, "events", "--job", job_id, "--json")
    assert [json.loads(line)["type"] for line in events.stdout.splitlines()] == ["job.enqueued", "job.failed"]
