"""What a run looks like in Redis, and the units (jobs, child runs) its steps launch.

A step's state is one JSON field ``s:<step>`` of the run hash:
``st`` pending / running / completed / failed / skipped; ``n`` launches so far (a retry of the
run launches again, under new ids); ``a`` attempt of the current launch and ``u0`` when it
was launched (a single step); ``t0``/``t1`` start and end (Redis ms); ``err``; ``why`` (a skip).
A parallel step adds ``total``, ``next`` (first item never launched), ``done``, ``nfail``,
``fl`` (items in flight: index -> [attempt, launched ms]), ``redo`` (items to launch again
first), ``fails`` (failed items) and ``stop`` (an item failed: launch no more). Counters,
not one key per item: a pass costs the same whether a step has 10 items or 10,000.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

RUN_ACTIVE = ("queued", "running", "cancelling")
RUN_ENDED = ("completed", "failed", "cancelled")
STEP_ENDED = ("completed", "failed", "skipped")
MAX_FAILS_KEPT = 1000


def new_state() -> dict[str, Any]:
    return {"st": "pending", "n": 0}


def load_state(raw: bytes | str | None) -> dict[str, Any]:
    return json.loads(raw) if raw else new_state()


def dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def suffix(launch: int, attempt: int) -> str:
    """Nothing for the first attempt of the first launch; ``@<launch>.<attempt>`` after."""
    return "" if (launch, attempt) == (1, 1) else f"@{launch}.{attempt}"


def job_id(run_id: str, step: str, index: int | None, launch: int, attempt: int) -> str:
    """``wf:<run>:<step>[:<item>][@<launch>.<attempt>]``: which run and step a job belongs to
    can be read from its id, and no two launches share one (a stale result is never taken
    for a new attempt's)."""
    item = "" if index is None else f":{index}"
    return f"wf:{run_id}:{step}{item}{suffix(launch, attempt)}"


def child_run_id(run_id: str, step: str, index: int | None, launch: int, attempt: int) -> str:
    item = "" if index is None else f".{index}"
    return f"{run_id}.{step}{item}{suffix(launch, attempt)}"


def parse_job_id(value: str) -> tuple[str, str, int | None] | None:
    """(run id, step, item index or None) of a step's job id; None for any other job."""
    if not value.startswith("wf:"):
        return None
    parts = value.split("@", 1)[0].split(":")
    if len(parts) == 3:
        return parts[1], parts[2], None
    if len(parts) == 4 and parts[3].isdigit():
        return parts[1], parts[2], int(parts[3])
    return None


@dataclass
class Unit:
    """One thing in flight for a step: its job, or its child run (``run`` steps)."""

    step: str
    index: int | None
    launch: int
    attempt: int
    launched: int  # Redis ms
    child: bool

    def id(self, run_id: str) -> str:
        make = child_run_id if self.child else job_id
        return make(run_id, self.step, self.index, self.launch, self.attempt)


@dataclass
class Outcome:
    """What a unit came to: ``kind`` done, failed, waiting or lost (never enqueued: a crash
    between the pass that decided it and its enqueue)."""

    kind: str
    output: Any = None
    error: str = ""
