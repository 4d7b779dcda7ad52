"""The routing options from the command line, as an operator types them (one engine: the
behaviour is the engine contract's, tests/test_routing.py)."""

from __future__ import annotations

import json
from typing import Any

from tests.test_operator import app, one_line_error


def test_enqueue_routing_flags_and_queue_listing(env: dict[str, str], start_worker: Any) -> None:
    enqueued = app(env, "enqueue", "add", "--priority", "high", "--group", "gpu", "--tags", "team=ml,run=7",
                   "--", "a=1", "b=2")
    assert enqueued.returncode == 0, enqueued.stderr
    job_id = enqueued.stdout.strip()
    rows = {r["queue"]: r for r in json.loads(app(env, "queues", "--json").stdout)}
    assert rows["contract"]["waiting_by_group"] == {"gpu": {"high": 1, "low": 0}}
    assert rows["contract"]["paused"] is False and rows["contract"]["routed"] is True
    start_worker("contract", "arq", "--group", "gpu")
    done = app(env, "result", job_id, "--wait", "--timeout", "30", "--info")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["result"] == 3 and record["tags"] == {"team": "ml", "run": "7"}
    assert "tags: team=ml,run=7" in done.stderr
    workers = json.loads(app(env, "workers", "--json").stdout)
    assert [w["group"] for w in workers] == ["gpu"]
    events = [json.loads(line) for line in app(env, "events", "--job", job_id, "--json").stdout.splitlines()]
    assert {e["type"]: e.get("tags") for e in events} == {
        "job.enqueued": "run=7,team=ml", "job.started": "run=7,team=ml", "job.completed": "run=7,team=ml"}


def test_pause_resume_and_dequeue_from_the_cli(env: dict[str, str]) -> None:
    assert "paused" in app(env, "queues", "pause", "contract").stdout
    assert "already paused" in app(env, "queues", "pause", "contract").stdout
    rows = {r["queue"]: r for r in json.loads(app(env, "queues", "--json").stdout)}
    assert rows["contract"]["paused"] is True
    first = app(env, "enqueue", "add", "--", "a=1", "b=1").stdout.strip()
    second = app(env, "enqueue", "add", "--", "a=1", "b=2").stdout.strip()
    taken = app(env, "dequeue", "contract", "--json")
    assert json.loads(taken.stdout) == [first]
    assert json.loads(app(env, "dequeue", "contract", "--job", second, "--json").stdout) == [second]
    empty = app(env, "dequeue", "contract")
    assert empty.returncode == 0 and "no job waits on contract" in empty.stderr
    assert "resumed" in app(env, "queues", "resume", "contract").stdout
    assert json.loads(app(env, "queues", "--json").stdout)[0]["paused"] is False


def test_bad_routing_input_is_one_line(env: dict[str, str]) -> None:
    assert "--priority" in one_line_error(app(env, "enqueue", "add", "--priority", "urgent"))
    assert "--fallback" in one_line_error(app(env, "enqueue", "add", "--fallback", "retry"))
    assert "--selector" in one_line_error(app(env, "enqueue", "add", "--selector", "gpu"))
    assert "--group" in one_line_error(app(env, "enqueue", "add", "--group", "a b"))
    assert "_worker_group or _worker_selector" in one_line_error(
        app(env, "enqueue", "add", "--group", "gpu", "--selector", "gpu=true"))
    assert "--tags" in one_line_error(app(env, "enqueue", "add", "--tags", "nokey"))
    assert "--group" in one_line_error(app(env, "worker", "contract", "--group", "-x"))
    assert "WORKER_GROUP" in one_line_error(app({**env, "WORKER_GROUP": "a b"}, "queues"))
    assert "WORKER_MAX_CONCURRENCY_CONTRACT" in one_line_error(
        app({**env, "WORKER_MAX_CONCURRENCY_CONTRACT": "many"}, "worker", "contract"))
    assert "unknown queue 'nope'" in one_line_error(app(env, "queues", "pause", "nope"))


async def test_a_lone_surrogate_is_refused_at_enqueue(make_settings: Any) -> None:
    import pytest

    from app.components.worker.api import WorkerClient
    from app.core.errors import PayloadError

    client = WorkerClient(make_settings())
    try:
        with pytest.raises(PayloadError, match="lone surrogate"):
            await client.enqueue("echo", "\ud800", _priority="high")
        assert (await client.enqueue("echo", "\U0001f600")).job_id  # a pair is fine
    finally:
        await client.close()
