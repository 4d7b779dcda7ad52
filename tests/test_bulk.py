"""enqueue_many's chained chunks (components/worker/bulk.py): the fast path writes the reference's
bytes, a refused chunk stops the ones after it, a resent chunk runs once."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import pytest

from app.components.worker.api import JobRequest, WorkerClient
from app.components.worker.bulk import FIRST_CHUNK, Bulk, Recorder, bounds
from app.components.worker.envelope import Envelope
from app.components.worker.events import read_events
from app.components.worker.runtime import scripts
from app.core.errors import PayloadError, RedisUnavailable
from tests.test_enqueue_guarantees import waiting_messages

ENGINES = ["arq", "dramatiq", "taskiq"]


def test_fast_envelopes_are_the_references(make_settings: Any) -> None:
    """Option-free jobs assemble their envelope from a plan: the same text as Envelope.encode
    and the same fields as the reference path (WorkerClient._envelope) gives the same request."""
    client = WorkerClient(make_settings(worker_backend="taskiq"))
    bulk = Bulk(client)
    requests = [
        JobRequest("add", (1, 2)),
        JobRequest("add", [1, 2], queue="contract"),
        JobRequest("echo", ("caf\u00e9 \"q\" \\ \n", "\u2603"), {"k": {"n": [1, None, 2.5, True]}}),
        JobRequest("echo", "abc"),  # a str is a sequence of arguments, as tuple(args) makes it
        JobRequest("echo", kwargs={"x": 1}, job_id="chosen \"\u00e9\" id", delay=2.5),
        JobRequest("urgent", ("t",), queue="routed"),  # the task's priority: a routed job
        JobRequest("limited", queue="routed"),  # a rate-limited task
        JobRequest("step", ("s",), queue="routed"),
    ]
    items = bulk.prepare(requests)
    for req, item in zip(requests, items, strict=True):
        assert item.env is None  # the fast path
        env = Envelope.decode(item.raw)
        assert env._encode_dict() == item.raw
        ref, _, _ = client._envelope(req.task, tuple(req.args), dict(req.kwargs), req.queue, req.job_id)
        assert dataclasses.replace(env, id=ref.id, run=ref.run, enqueued_at=ref.enqueued_at) == ref
        assert (env.id, env.run) == (item.id, item.run) and len(item.run) == 16
        if req.job_id is None:
            assert uuid.UUID(item.id).hex == item.id and uuid.UUID(item.id).version == 4
    assert [item.delay_ms for item in items] == [0, 0, 0, 0, 2500, 0, 0, 0]
    assert len({item.id for item in items}) == len(items)
    odd = bulk.prepare([JobRequest("add", (1, 2), tags={"a": "b"}), JobRequest("echo", ("\U0001f600",))])
    assert odd[0].env is not None and odd[1].env is not None  # options, and text the surrogate check reads
    assert [item.raw for item in odd] == [item.env.encode() for item in odd if item.env]
    for bad in (("\ud800",), (float("nan"),), ("y" * 2_000_000,)):
        with pytest.raises(PayloadError):
            bulk.prepare([JobRequest("add", (1, 2)), JobRequest("echo", bad)])


@pytest.mark.parametrize("engine", ENGINES)
async def test_recorded_engine_commands_are_redis_pys(engine: str, client: WorkerClient) -> None:
    """The bulk path records an engine's staged commands without a redis-py pipeline: the same
    words, for fresh messages and for one of a caller-chosen id."""
    adapter = client._adapter("contract")
    messages = [(f"m{n}.1.x", f'{{"id":"m{n}","n":"\u00e9"}}') for n in range(3)]
    for batch in (messages, messages[:1]):
        recorder, pipe = Recorder(), client.redis.pipeline(transaction=False)
        await adapter.stage(recorder, batch)
        await adapter.stage(pipe, batch)
        got, want = recorder.command_stack, [words for words, _ in pipe.command_stack]
        if engine != "taskiq":  # a fresh Redis id (Dramatiq) and the enqueue time (ms) may differ
            got, want = [(w[0], w[1], len(w)) for w in got], [(w[0], w[1], len(w)) for w in want]
        assert got == want


def test_job_request_is_still_a_frozen_dataclass() -> None:
    req = JobRequest("add", (1, 2), queue="q")
    assert req.kwargs == {} and req.job_id is None and req == JobRequest("add", (1, 2), queue="q")
    assert dataclasses.replace(req, queue="r").queue == "r"
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.queue = "x"  # type: ignore[misc]


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_refused_chunk_stops_the_rest(engine: str, client: WorkerClient) -> None:
    """Chunk 2 fails in Redis (its first job's record key holds the wrong type): chunk 1 stays
    accepted, chunk 3 is not applied although it was already sent, and the error says so."""
    total = FIRST_CHUNK + 250 + 10
    assert len(bounds(total)) == 3
    requests = [JobRequest("add", (n, 1)) for n in range(total)]
    requests[FIRST_CHUNK] = JobRequest("add", (0, 0), job_id="wrong-type")
    await client.redis.set(client.keys.job("wrong-type"), "not a hash")
    with pytest.raises(RedisUnavailable) as refused:
        await client.enqueue_many(requests)
    message = str(refused.value)
    assert f"{FIRST_CHUNK} of {total} jobs were accepted before that and will run; the rest were not" in message
    assert "WRONGTYPE" in message and "\n" not in message
    enqueued = [e async for e in read_events(client.redis, client.keys, type_="job.enqueued")]
    assert len(enqueued) == FIRST_CHUNK
    assert await waiting_messages(client, engine) == FIRST_CHUNK


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_resent_chunk_runs_once(engine: str, client: WorkerClient) -> None:
    """The same chained call sent twice (its reply lost) answers its first flags and writes
    nothing more; a call whose predecessor in the chain never ran writes nothing."""
    bulk = Bulk(client)
    items = bulk.prepare([JobRequest("add", (n, 1)) for n in range(3)] + [JobRequest("add", (9, 9), job_id="mine")])
    await client.redis.script_load(scripts.source("enqueue"))
    sha = client._enqueue_script.sha

    async def call(chain: str, position: int) -> Any:
        args = await bulk.chunk_args(items, {"contract": engine}, position)
        return await client.redis.evalsha(sha, 2, client.keys.events, client.keys.enqueue_chain(chain), *args)

    assert await call("c1", 1) == [1, 1, 1, 1]
    assert await call("c1", 1) == [2, 2, 2, 2]  # recognised: nothing written twice
    assert await call("c1", 3) is None  # position 2 never ran
    assert await call("c2", 2) is None
    assert await waiting_messages(client, engine) == 4
    enqueued = [e async for e in read_events(client.redis, client.keys, type_="job.enqueued")]
    assert sorted(e["job_id"] for e in enqueued) == sorted(item.id for item in items)
    record = await client.redis.hgetall(client.keys.job("mine"))
    assert json.loads(record[b"envelope"])["args"] == [9, 9] and record[b"status"] == b"queued"
