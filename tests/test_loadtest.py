"""`app loadtest` against real workers on every engine: counts and report shape, never timings."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import ENGINES, ROOT

KEYS = {"jobs", "completed", "failed", "enqueue_jobs_s", "throughput_jobs_s", "latency_ms", "runtime_ms",
        "by_worker", "errors"}


def loadtest(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", "loadtest", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("engine", ENGINES)
def test_noop_jobs_all_complete(engine: str, env: dict[str, str], start_worker: Any) -> None:
    worker = start_worker("load_test", engine)
    proc = loadtest(env, "--type", "noop", "--jobs", "200", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert KEYS <= set(report)
    assert report["jobs"] == 200 and report["completed"] == 200 and report["failed"] == 0
    assert report["errors"] == {}
    assert sum(report["by_worker"].values()) == 200
    assert any(key.endswith(f"@{worker.proc.pid}") for key in report["by_worker"])
    for figure in ("latency_ms", "runtime_ms"):
        assert set(report[figure]) == {"p50", "p95", "p99"}
        assert report[figure]["p50"] <= report[figure]["p95"] <= report[figure]["p99"]
    assert report["enqueue_jobs_s"] > 0 and report["throughput_jobs_s"] > 0


@pytest.mark.parametrize("engine", ENGINES)
def test_failures_are_counted_by_error(engine: str, env: dict[str, str], start_worker: Any) -> None:
    start_worker("load_test", engine)
    proc = loadtest(env, "--type", "failure", "--jobs", "20", "--json", "--", "failure_rate=1.0")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["failed"] == 20 and report["completed"] == 0
    assert report["errors"] == {"RuntimeError: simulated failure (failure_rate=1.0)": 20}


def test_no_worker_fails_at_once_with_one_line(env: dict[str, str]) -> None:
    proc = loadtest(env, "--jobs", "10", "--json")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "app worker load_test" in lines[0]
    assert proc.stdout == ""


def test_bad_arguments_are_one_line(env: dict[str, str], start_worker: Any) -> None:
    start_worker("load_test", "arq")
    for args, needle in ((("--type", "nope"), "--type 'nope' is invalid"),
                         (("--type", "noop", "--", "foo=1"), "no noop task takes foo"),
                         (("--", "failure_rate=1", "--jobs", "5"), "put options before --")):
        proc = loadtest(env, *args)
        assert proc.returncode == 2
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0], proc.stderr
