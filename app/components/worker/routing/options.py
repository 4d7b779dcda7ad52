"""The routing options of a job, as the producer resolves them (enqueue > task > queue).

    @task(priority="high", worker_group="gpu", fallback="fail", rate_limit="100/m")

A job *needs routing* when it has a priority other than the default, targets a group or a
label selector, or belongs to a queue that is routed as a whole (``max_concurrency``, a task
with a rate limit or a priority, a group or selector on the queue). Everything here is plain
data checked once, at definition or at enqueue, with one-line errors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.core.errors import InvalidOption

PRIORITIES = ("high", "low")
FALLBACKS = ("wait", "fail", "cancel")
DEFAULT_PRIORITY = "low"
BAND = {"high": 0, "low": 1}  # the score band of a ready entry: high before low

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_LABEL = re.compile(r"^[A-Za-z0-9_.\-/]{1,64}$")
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600,
           "d": 86400, "day": 86400}


def check_priority(value: Any, where: str = "priority") -> str:
    text = value.strip().lower() if isinstance(value, str) else value
    if text not in PRIORITIES:
        raise InvalidOption(f"{where}={value!r} is invalid: use 'high' or 'low'")
    return str(text)


def check_fallback(value: Any, where: str = "fallback") -> str:
    text = value.strip().lower() if isinstance(value, str) else value
    if text not in FALLBACKS:
        raise InvalidOption(f"{where}={value!r} is invalid: use 'wait', 'fail' or 'cancel'")
    return str(text)


def check_group(value: Any, where: str = "worker_group") -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidOption(f"{where}={value!r} is invalid: use 1-64 letters, digits, _ . - (not starting with . or -)")
    return value


def check_selector(value: Any, where: str = "worker_selector") -> dict[str, str]:
    """A non-empty mapping of label -> value, both short plain words."""
    if not isinstance(value, Mapping) or not value:
        raise InvalidOption(f"{where} must be a non-empty mapping of label -> value, like {{'gpu': 'true'}}")
    out: dict[str, str] = {}
    for key, val in value.items():
        if not isinstance(key, str) or not _LABEL.match(key) or not isinstance(val, str) or not _LABEL.match(val):
            raise InvalidOption(f"{where} pair {key!r}={val!r} is invalid: labels and values are 1-64 of "
                                "letters, digits, _ . - /")
        out[key] = val
    return dict(sorted(out.items()))


def check_tags(value: Any, where: str = "tags") -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise InvalidOption(f"{where} must be a mapping of str -> str, like {{'team': 'billing'}}")
    out: dict[str, str] = {}
    for key, val in value.items():
        if not isinstance(key, str) or not isinstance(val, str) or not key or "," in key + val or "=" in key:
            raise InvalidOption(f"{where} pair {key!r}={val!r} is invalid: use str keys and values without ',' "
                                "(and no '=' in keys)")
        if len(key) > 64 or len(val) > 256:
            raise InvalidOption(f"{where} pair {key[:20]!r}... is too long: keys up to 64, values up to 256 characters")
        out[key] = val
    if len(out) > 32:
        raise InvalidOption(f"{where}: at most 32 tags per job")
    return out


def canonical_selector(selector: Mapping[str, str]) -> str:
    """``k=v,k=v`` sorted by label: one name per selector, for its ready set."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def parse_pairs(items: list[str] | str, what: str) -> dict[str, str]:
    """``k=v,k=v`` (or a list of them) from the CLI or the environment."""
    parts = items.split(",") if isinstance(items, str) else [p for item in items for p in item.split(",")]
    out: dict[str, str] = {}
    for part in parts:
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise InvalidOption(f"{what} {part!r} is invalid: write key=value")
        out[key.strip()] = value.strip()
    return out


@dataclass(frozen=True)
class RateLimit:
    """At most ``count`` starts per ``period_ms`` across all workers (a sliding window)."""

    count: int
    period_ms: int

    @classmethod
    def parse(cls, text: Any, where: str = "rate_limit") -> RateLimit:
        match = _RATE.match(text) if isinstance(text, str) else None
        if not match or int(match.group(1)) < 1:
            raise InvalidOption(f"{where}={text!r} is invalid: write N/period, like '100/m', '5/s', '1000/h', '10/5m'")
        span = int(match.group(2) or 1) * _UNIT_S[match.group(3).lower()]
        if span < 1:
            raise InvalidOption(f"{where}={text!r} is invalid: the period must be at least 1 second")
        return cls(int(match.group(1)), span * 1000)


@dataclass(frozen=True)
class Route:
    """Where and when one job may start: the resolved options of one enqueue."""

    priority: str = DEFAULT_PRIORITY
    group: str = ""
    selector: str = ""  # canonical k=v,k=v
    fallback: str = "wait"

    @property
    def targeted(self) -> bool:
        return bool(self.group or self.selector)

    @property
    def needed(self) -> bool:
        """This job alone needs routing (whatever its queue does)."""
        return self.priority != DEFAULT_PRIORITY or self.targeted


def first(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None
