"""The live feed: Server-Sent Events read from the event stream.

Each message's SSE ``id`` is its stream entry id. A browser's ``EventSource`` sends the last
id it saw as ``Last-Event-ID`` when it reconnects, and the feed goes on from the entry after
it (an exclusive XREAD): no gap, no duplicate, across a cut connection and across a restart
of the dashboard, since the position lives in the client and the events in Redis. A client
that has no id yet passes ``after`` (the newest id it rendered); with neither, the feed
starts at the newest entry. Events filtered out are skipped; a comment line is sent every
``KEEPALIVE_S`` so proxies do not close an idle connection.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from app.components.overseer.history import matches

BLOCK_MS = 1000
KEEPALIVE_S = 15.0
RETRY_MS = 1000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def message(event: dict[str, str]) -> str:
    return f"id: {event['id']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


async def feed(redis: Any, stream: str, last: str | None, filters: dict[str, str | None],
               is_disconnected: Any = None) -> AsyncIterator[str]:
    """SSE text: events after ``last`` (exclusive), for as long as the client listens."""
    if not last:
        newest = await redis.xrevrange(stream, count=1)
        last = _text(newest[0][0]) if newest else "0-0"
    yield f"retry: {RETRY_MS}\n: from {last}\n\n"
    quiet_since = time.monotonic()
    while True:
        if is_disconnected is not None and await is_disconnected():
            return
        batches = await redis.xread({stream: last}, count=500, block=BLOCK_MS)
        entries = batches[0][1] if batches else []
        sent = []
        for entry_id, fields in entries:
            last = _text(entry_id)
            event = {_text(k): _text(v) for k, v in fields.items()}
            event["id"] = last
            if matches(event, **filters):
                sent.append(message(event))
        if sent:
            quiet_since = time.monotonic()
            yield "".join(sent)
        elif time.monotonic() - quiet_since > KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield ": keepalive\n\n"


def valid_id(value: str | None) -> str | None:
    """A stream id (``ms-seq`` or ``ms``) or None; anything else is ignored, not an error."""
    if not value:
        return None
    ms, _, seq = value.strip().partition("-")
    if ms.isdigit() and (not seq or seq.isdigit()):
        return value.strip() if seq else f"{ms}-0"
    return None
