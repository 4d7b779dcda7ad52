"""The hot path's hand-built encodings equal what the libraries they stand in for would write."""

from __future__ import annotations

import json
from typing import Any

import pytest
from taskiq.message import TaskiqMessage
from taskiq_redis import RedisStreamBroker

from app.components.worker.engines.taskiq_engine import _checked, _sent
from app.components.worker.envelope import DISPATCH_NAME, Envelope

RAWS = ['{"id":"x"}', 'caf\u00e9 "quoted" \\ back\nslash', "\u2603 \U0001f600", ""]


@pytest.mark.parametrize("raw", RAWS)
def test_taskiq_message_is_taskiqs_own(raw: str) -> None:
    broker = RedisStreamBroker("redis://localhost:1")
    message = TaskiqMessage(task_id="job.1.ab", task_name=DISPATCH_NAME, labels={}, labels_types={},
                            args=[raw], kwargs={})
    assert _sent("job.1.ab", raw) == broker.formatter.dumps(message).message
    assert _checked(_sent("job.1.ab", raw), {}) == (_sent("job.1.ab", raw), raw)


def test_envelope_encoding_is_compact_json() -> None:
    env = Envelope("j", "t", "q", [1, "\u00e9", {"a": None}], {"k": 1.5}, 2, 123, "ab", tags={"x": "y"})
    assert env.encode() == json.dumps(json.loads(env.encode()), separators=(",", ":"))
    assert Envelope.decode(env.encode()) == env
    with pytest.raises(Exception, match="cannot be sent as JSON"):
        Envelope("j", "t", "q", [float("nan")]).encode()


def test_job_ids_are_uuid4_hex() -> None:
    import uuid

    from app.components.worker.envelope import new_job_id

    ids = {new_job_id() for _ in range(2000)}
    assert len(ids) == 2000
    for job_id in list(ids)[:200]:
        parsed = uuid.UUID(job_id)
        assert parsed.hex == job_id and parsed.version == 4 and parsed.variant == uuid.RFC_4122


@pytest.mark.parametrize("engine", ["arq", "dramatiq", "taskiq"])
async def test_one_bulk_call_of_mixed_jobs(engine: str, client: Any) -> None:
    """enqueue.lua sends what jobs share once per call: jobs of different shapes in one call
    (tags, a delay, a chosen id, a duplicate of it) each keep their own fields, and a call made
    after Redis lost its scripts (SCRIPT FLUSH) still goes through."""
    from app.components.worker.api import JobRequest

    await client.redis.script_flush()
    jobs = await client.enqueue_many([
        JobRequest("add", (1, 2)),
        JobRequest("add", (3, 4), tags={"team": "a"}),
        JobRequest("add", (5, 6), delay=30),
        JobRequest("add", (7, 8), job_id="mixed-1"),
        JobRequest("add", (9, 9), job_id="mixed-1"),
        JobRequest("add", (1, 1), tags={"team": "b"}),
    ])
    assert [job is not None for job in jobs] == [True, True, True, True, False, True]
    records = [await client.redis.hgetall(client.keys.job(job.job_id)) for job in jobs if job is not None]
    assert [r[b"status"] for r in records] == [b"queued", b"queued", b"delayed", b"queued", b"queued"]
    assert [json.loads(r[b"envelope"])["args"] for r in records] == [[1, 2], [3, 4], [5, 6], [7, 8], [1, 1]]
    assert [json.loads(r[b"envelope"]).get("tags") for r in records] == [None, {"team": "a"}, None, None,
                                                                          {"team": "b"}]
    events = await client.redis.xrange(client.keys.events)
    assert [(f[b"job_id"].decode(), f.get(b"tags")) for _, f in events if f[b"type"] == b"job.enqueued"] == [
        (job.job_id, {1: b"team=a", 4: b"team=b"}.get(i)) for i, job in enumerate(j for j in jobs if j is not None)]


@pytest.mark.parametrize("raw", RAWS)
def test_dramatiq_message_is_dramatiqs_own(raw: str) -> None:
    import uuid

    import dramatiq

    from app.components.worker.engines.dramatiq_engine import _encoded, _uuid_text

    message = dramatiq.Message(queue_name="worker:dramatiq:q", actor_name=DISPATCH_NAME, args=(raw,), kwargs={},
                               options={"redis_message_id": "r-1"}, message_id="job.1.ab", message_timestamp=1234)
    assert _encoded("worker:dramatiq:q", raw, "r-1", "job.1.ab", 1234) == message.encode()
    text = _uuid_text()
    assert str(uuid.UUID(text)) == text and uuid.UUID(text).version == 4


@pytest.mark.parametrize("raw", RAWS)
def test_arq_job_is_arqs_own(raw: str) -> None:
    from arq.jobs import serialize_job

    from app.components.worker.engines.arq_engine import _dumps, _serialized

    assert _serialized(raw, 1234) == serialize_job(DISPATCH_NAME, (raw,), {}, None, 1234, serializer=_dumps)


def test_envelope_fast_encoding_equals_the_reference() -> None:
    import itertools

    variants = itertools.product(
        ([], [1, "\u00e9", None, 2.5, True, {"x": [1]}]), ({}, {"k": "v", "n": {"m": 1}}), ("low", "high"),
        ("", "gpu"), ("", "zone=a"), (False, True), ({}, {"team": "\u2603"}), (None, 2.5, 10), (None, 3))
    for args, kwargs, priority, group, selector, routed, tags, timeout, max_tries in variants:
        env = Envelope("job-\u00e9", "task", "queue", args, kwargs, 2, 1_700_000_000_000, "ab12", priority, group,
                       selector, routed, tags, routed, timeout, max_tries)
        assert env._encode_fast() == env._encode_dict()
        assert Envelope.decode(env.encode()) == env
    odd = Envelope("j", "t", "q", priority=None)  # type: ignore[arg-type]  # not the usual types: the reference
    assert odd.encode() == odd._encode_dict()
