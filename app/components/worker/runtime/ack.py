"""The engine's ack of the delivery being handled, done by the finish script when it can.

An engine acks a message once the runtime returns from it: one more round trip per job
(TaskIQ's XACK + XDEL, Dramatiq's ack script, arq's clean-up of its job keys). When the
adapter puts an ``EngineAck`` in ``DELIVERY_ACK`` around its call of the runtime, finish.lua
does that ack in the same script as the job's terminal state (so both happen or neither), and
``done`` tells the adapter to skip its own. Every other outcome (a skipped duplicate, a retry,
a hand-back, a rejection) leaves ``done`` False and the adapter acks as before.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass
class EngineAck:
    kind: str  # 'taskiq' | 'dramatiq' | 'arq': the branch of finish.lua
    keys: list[str]
    args: list[str] = field(default_factory=list)  # at most two
    done: bool = False


DELIVERY_ACK: ContextVar[EngineAck | None] = ContextVar("delivery_ack", default=None)
