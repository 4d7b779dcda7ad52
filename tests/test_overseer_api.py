"""The dashboard's JSON API, SSE feed and /metrics, against a real Redis and real workers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, wait_until
from tests.overseer_support import AUTH, TOKEN, Dashboard, dashboard, enqueue, finished


def metrics(url: str) -> dict[str, list[Any]]:
    """/metrics parsed with prometheus-client's own parser: sample name -> samples."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    found = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(found)


def get(url: str, path: str, **params: Any) -> Any:
    answer = httpx.get(f"{url}{path}", params=params, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.mark.parametrize("engine", ["arq", "dramatiq", "taskiq"])
def test_api_and_metrics_follow_jobs_on_every_engine(engine: str, env: dict[str, str], start_worker: Any) -> None:
    start_worker("contract", engine)
    env = {**env, "WORKER_BACKEND_CONTRACT": engine}
    with dashboard(env) as board:
        ok = enqueue(env, "add", "--", "a=2", "b=3")
        bad = enqueue(env, "always_fails", "--", "message=broken on purpose")
        done = wait_until(lambda: finished(board.url, ok), 30, what="add to finish")
        failed = wait_until(lambda: finished(board.url, bad), 30, what="always_fails to fail")
        assert done["result"] == 5 and done["engine"] == engine and done["kwargs"] == {"a": 2, "b": 3}
        assert failed["status"] == "failed" and failed["error"] == "broken on purpose"
        assert failed["error_type"] == "ValueError" and failed["attempts"] == 3
        trail = [e["type"] for e in failed["events"]]
        assert trail == ["job.enqueued"] + ["job.started", "job.retried"] * 2 + ["job.started", "job.failed"]

        def settled() -> dict[str, Any] | None:  # "running" comes from heartbeats: one beat late
            row = {q["queue"]: q for q in get(board.url, "/api/queues")}["contract"]
            return row if row["running"] == 0 else None

        row = wait_until(settled, 10, what="running back to 0")
        assert row["engine"] == engine and row["workers"] == 1 and row["paused"] is False
        assert row["ready"] == 0 and row["running"] == 0 and row["run_time"]["sample"] >= 4
        assert sum(m["completed"] for m in row["history"]) == 1 and sum(m["failed"] for m in row["history"]) == 1
        workers = get(board.url, "/api/workers", queue="contract")
        assert [(w["engine"], w["state"]) for w in workers] == [(engine, "healthy")]

        recent = {j["job_id"]: j for j in get(board.url, "/api/jobs", queue="contract")}
        assert recent[ok]["status"] == "completed" and recent[bad]["status"] == "failed"
        assert [j["job_id"] for j in get(board.url, "/api/jobs", task="add")] == [ok]
        assert [j["job_id"] for j in get(board.url, "/api/jobs", queue="contract", status="failed")] == [bad]

        samples = metrics(board.url)
        labels = {"queue": "contract", "engine": engine}
        assert value(samples, "app_jobs_total", task="add", outcome="completed", **labels) == 1
        assert value(samples, "app_jobs_total", task="always_fails", outcome="retried", **labels) == 2
        assert value(samples, "app_jobs_total", task="always_fails", outcome="failed", **labels) == 1
        assert value(samples, "app_jobs_enqueued_total", **labels) == 2
        assert value(samples, "app_job_run_seconds_count", task="always_fails", **labels) == 3
        assert value(samples, "app_job_run_seconds_bucket", task="add", le="+Inf", **labels) == 1
        assert value(samples, "app_workers", state="healthy", **labels) == 1
        assert value(samples, "app_queue_jobs", state="ready", **labels) == 0
        assert "app_queue_paused" in samples


def test_counts_live_in_redis_across_restarts_and_replicas(env: dict[str, str], start_worker: Any) -> None:
    """Two dashboards at once count each event once; a restarted one goes on from Redis; the
    jobs run on a worker of two processes."""
    start_worker("contract", "arq", "--processes", "2")
    first = Dashboard(env).start()
    second = Dashboard(env).start()
    try:
        ids = [enqueue(env, "add", "--", f"a={n}", "b=1") for n in range(5)]
        for job_id in ids:
            wait_until(lambda job_id=job_id: finished(first.url, job_id), 30, what="jobs to finish")

        def completed(url: str) -> float:
            return value(metrics(url), "app_jobs_total", task="add", outcome="completed")

        assert wait_until(lambda: completed(first.url) == 5, 10, what="5 counted")
        assert completed(second.url) == 5
        first.stop()
        assert completed(second.url) == 5
        first = Dashboard(env, port=first.port).start()
        enqueue(env, "add", "--", "a=9", "b=9")
        assert wait_until(lambda: completed(first.url) == 6, 30, what="the sixth counted")
        assert completed(second.url) == 6
    finally:
        first.stop()
        second.stop()


def sse(url: str, headers: dict[str, str], want: int, **params: str) -> list[dict[str, str]]:
    """Read ``want`` events from the SSE feed, then cut the connection."""
    events: list[dict[str, str]] = []
    with httpx.stream("GET", f"{url}/api/events/stream", headers=headers, params=params, timeout=30) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        current: dict[str, str] = {}
        for line in answer.iter_lines():
            if line.startswith("id: "):
                current["sse_id"] = line[4:]
            elif line.startswith("data: "):
                current.update(json.loads(line[6:]))
            elif line == "" and "sse_id" in current:
                assert current["sse_id"] == current["id"]
                events.append(current)
                current = {}
                if len(events) == want:
                    break
    return events


def test_sse_feed_resumes_from_last_event_id_without_gap_or_duplicate(
    env: dict[str, str], redis_url: str, prefix: str, start_worker: Any
) -> None:
    start_worker("contract", "arq")
    client = redis.Redis.from_url(redis_url)
    with dashboard(env) as board:
        for n in range(4):
            enqueue(env, "add", "--", f"a={n}", "b=0")
        wait_until(lambda: client.xlen(f"{prefix}:events") >= 13, 30, what="4 jobs' events")
        head = sse(board.url, {"Last-Event-ID": "0"}, 5)
        for n in range(3):  # written while no one listens
            enqueue(env, "add", "--", f"a={n}", "b=100")
        wait_until(lambda: client.xlen(f"{prefix}:events") >= 22, 30, what="3 more jobs' events")
        stored = [e[0].decode() for e in client.xrange(f"{prefix}:events")]
        tail = sse(board.url, {"Last-Event-ID": head[-1]["id"]}, len(stored) - 5)
        assert [e["id"] for e in head + tail] == stored
        filtered = sse(board.url, {}, 3, after="0", type="job.completed")
        assert [e["type"] for e in filtered] == ["job.completed"] * 3
        page = get(board.url, "/api/events", after=head[-1]["id"], limit=3)
        assert [e["id"] for e in page] == stored[5:8]
    client.close()


def test_actions_need_the_token(env: dict[str, str], start_worker: Any) -> None:
    with dashboard(env) as board:
        later = enqueue(env, "add", "--delay", "600", "--", "a=1", "b=1")
        cancel = f"{board.url}/api/jobs/{later}/cancel"
        assert httpx.post(cancel).status_code == 401
        assert httpx.post(cancel, headers={"Authorization": "Bearer wrong"}).status_code == 401
        refused = httpx.post(f"{board.url}/api/queues/contract/pause")
        assert refused.status_code == 401 and "DASHBOARD_TOKEN" in refused.json()["detail"]
        answer = httpx.post(cancel, headers=AUTH)
        assert answer.status_code == 200, answer.text
        assert get(board.url, f"/api/jobs/{later}")["status"] == "cancelled"
        again = httpx.post(cancel, headers=AUTH)
        assert again.status_code == 409 and "only a waiting" in again.json()["detail"]
        assert httpx.post(f"{board.url}/api/jobs/nope/cancel", headers=AUTH).status_code == 404
        assert httpx.post(f"{board.url}/api/queues/nosuch/pause", headers=AUTH).status_code == 404
        paused = httpx.post(f"{board.url}/api/queues/contract/pause", headers=AUTH)
        assert paused.status_code == 200
        assert {q["queue"]: q for q in get(board.url, "/api/queues")}["contract"]["paused"] is True
        assert httpx.post(f"{board.url}/api/queues/contract/resume", headers=AUTH).status_code == 200
        dead = get(board.url, "/api/dead")
        assert dead["total"] == 0 and dead["jobs"] == [] and "contract" in dead["by_queue"]
    with dashboard(env, token=None) as board:
        read_only = httpx.post(f"{board.url}/api/queues/contract/pause", headers=AUTH)
        assert read_only.status_code == 403 and "read-only" in read_only.json()["detail"]
        page = httpx.get(f"{board.url}/").text
        assert "read-only" in page and "data-post" not in page  # no action buttons


def test_pages_and_static_files_are_served_from_the_package(env: dict[str, str]) -> None:
    with dashboard(env) as board:
        for path in ("/", "/workers", "/events", "/jobs", "/dead", "/jobs?queue=contract&status=failed"):
            page = httpx.get(f"{board.url}{path}", timeout=10)
            assert page.status_code == 200 and "<html" in page.text, path
            assert "http://" not in page.text and "https://" not in page.text, f"{path} loads something remote"
        assert httpx.get(f"{board.url}/jobs/unknown-id").status_code == 404
        found = httpx.get(f"{board.url}/jobs", params={"id": "abc"}, follow_redirects=False)
        assert found.status_code == 303 and found.headers["location"] == "/jobs/abc"
        script = httpx.get(f"{board.url}/static/overseer.js")
        assert script.status_code == 200 and "EventSource" in script.text
        assert httpx.get(f"{board.url}/static/..%2Fapp.py").status_code == 404


def test_router_mounts_under_a_prefix_in_a_host_app(make_settings: Any) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from app.components.overseer import overseer_router

    host = FastAPI()
    host.include_router(overseer_router(make_settings(), prefix="/ops"))
    with TestClient(host) as client:
        page = client.get("/ops/")
        assert page.status_code == 200 and 'href="/ops/workers"' in page.text
        assert client.get("/ops/api/workers").json() == []
        assert "app_events_counted_total" in client.get("/ops/metrics").text


def test_cli_refuses_a_public_bind_without_a_token(env: dict[str, str]) -> None:
    env = {k: v for k, v in env.items() if k != "DASHBOARD_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "app", "dashboard", "--host", "0.0.0.0", "--port", "1"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: refusing to serve on 0.0.0.0 without DASHBOARD_TOKEN: set DASHBOARD_TOKEN, or bind to 127.0.0.1"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run([sys.executable, "-m", "app", "dashboard", "--port", str(port)],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert busy.returncode == 2 and len(busy.stderr.strip().splitlines()) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr and "choose another --port" in busy.stderr


async def test_fold_counts_each_event_once_and_the_ones_trimmed_before_it(redis_url: str, prefix: str) -> None:
    """The counters move with their cursor in one script; entries trimmed before a fold are
    counted as dropped (Redis 7: XINFO STREAM entries-added)."""
    import redis.asyncio as aioredis

    from app.components.overseer.counters import Folder, read_counters
    from app.components.worker.keys import Keys

    client = aioredis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    folder, other = Folder(client, keys), Folder(client, keys)

    def event(n: int) -> dict[str, str]:
        return {"type": "job.completed", "queue": "q", "task": "t", "backend": "arq", "job_id": f"j{n}",
                "duration_ms": str(n % 7), "error": ""}

    try:
        for n in range(50):
            await client.xadd(keys.events, event(n))
        assert await folder.fold() == 50
        assert await other.fold() == 0  # a second dashboard finds nothing left to count
        for n in range(500):
            await client.xadd(keys.events, event(n), maxlen=100, approximate=False)
        assert await other.fold() == 100
        counters = await read_counters(client, keys)
        assert counters.jobs[("q", "t", "arq", "completed")] == 150 and counters.folded == 150
        assert counters.timed[("q", "t", "arq")] == 150 and sum(counters.buckets[("q", "t", "arq")]) == 150
        major = int((await client.info("server"))["redis_version"].split(".")[0])
        assert counters.dropped == (400 if major >= 7 else None)
    finally:
        await client.aclose()


def test_dead_letters_listed_retried_and_purged(env: dict[str, str], start_worker: Any) -> None:
    start_worker("contract", "arq")
    with dashboard(env) as board:
        ids = [enqueue(env, "always_fails", "--", f"message=dead {n}") for n in range(2)]
        for job_id in ids:
            wait_until(lambda job_id=job_id: finished(board.url, job_id), 30, what="jobs to die")
        dead = get(board.url, "/api/dead", queue="contract")
        assert dead["total"] == 2
        assert {(d["job_id"], d["error"]) for d in dead["jobs"]} == {(ids[0], "dead 0"), (ids[1], "dead 1")}
        assert get(board.url, f"/api/jobs/{ids[0]}")["dead"] is True
        assert get(board.url, "/api/dead", queue="contract", limit=1, offset=1)["jobs"] == dead["jobs"][1:]
        assert httpx.post(f"{board.url}/api/dead/retry", params={"queue": "contract"}).status_code == 401
        retried = httpx.post(f"{board.url}/api/dead/retry", params={"queue": "contract"}, headers=AUTH)
        assert retried.status_code == 200 and retried.json()["retried"] == 2
        wait_until(lambda: get(board.url, "/api/dead", queue="contract")["total"] == 2
                   and all(finished(board.url, j) for j in ids), 30, what="both dead again")
        assert httpx.post(f"{board.url}/api/dead/not-dead/retry", headers=AUTH).status_code == 404
        purged = httpx.post(f"{board.url}/api/dead/purge", params={"queue": "contract"}, headers=AUTH)
        assert purged.status_code == 200 and purged.json()["purged"] == 2
        assert get(board.url, "/api/dead")["total"] == 0
        samples = metrics(board.url)
        assert value(samples, "app_queue_jobs", queue="contract", state="dead") == 0


@pytest.mark.parametrize("token", ["", TOKEN], ids=["no-token", "token"])
def test_compose_dashboard_service_runs(token: str, redis_url: str, prefix: str, tmp_path: Any) -> None:
    """The `dashboard` service's command, environment and healthcheck, on the test Redis (on a
    free port instead of 8000): refused without DASHBOARD_TOKEN, healthy with it."""
    from tests.overseer_support import free_port
    from tests.test_deploy import resolved_compose

    svc = resolved_compose(tmp_path, DASHBOARD_TOKEN=token)["services"]["dashboard"]
    assert svc["profiles"] == ["dashboard"]
    assert any(str(p.get("host_ip") if isinstance(p, dict) else p).startswith("127.0.0.1") for p in svc["ports"])
    port = str(free_port())
    command = [port if part == "8000" else part for part in svc["command"]]
    health = [part.replace(":8000/", f":{port}/") for part in svc["healthcheck"]["test"]]
    assert command[:3] == ["dashboard", "--host", "0.0.0.0"] and health[0] == "CMD"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("WORKER_", "REDIS_", "DASHBOARD_"))}
    env.update({k: "" if v is None else str(v) for k, v in svc["environment"].items()})
    env.update({"REDIS_URL": redis_url, "WORKER_KEY_PREFIX": prefix, "PYTHONPATH": str(ROOT)})
    workdir = tmp_path / "workdir"  # no .env here
    workdir.mkdir()
    board = subprocess.Popen([sys.executable, "-m", "app", *command], env=env, cwd=workdir,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if not token:
            _, err = board.communicate(timeout=30)
            assert board.returncode == 2 and "without DASHBOARD_TOKEN" in err
            return
        check = [sys.executable if health[1] == "python" else health[1], *health[2:]]

        def healthy() -> bool:
            assert board.poll() is None, board.communicate()[1]
            return subprocess.run(check, env=env, capture_output=True, timeout=10).returncode == 0

        wait_until(healthy, 30, interval=0.1, what="the dashboard service's healthcheck")
    finally:
        if board.poll() is None:
            board.terminate()
            board.communicate(timeout=10)
