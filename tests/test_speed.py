"""The hot path's hand-built encodings equal what the libraries they stand in for would write."""

from __future__ import annotations

import json

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
