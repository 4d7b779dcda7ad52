"""One rule for what producers may ask, shared by the API and the CLI.

Every check raises an ``AppError`` whose message is one line naming the option, the rule
and what to do; the value itself is shown only when it is short (never a payload).

Limits:
- delay: a finite number of seconds, 0 <= delay <= ``MAX_DELAY_S`` (365 days).
- timeout: a finite number of seconds, 0 < timeout <= ``MAX_TIMEOUT_S`` (365 days).
- job id: a non-empty str of at most ``MAX_JOB_ID_LEN`` characters, encodable as UTF-8
  (no lone surrogates), with no control characters.
- arguments: nested at most ``MAX_DEPTH`` lists/dicts deep, so every worker can decode them
  (Python's JSON decoder recurses once per level; the default recursion limit is 1000).
"""

from __future__ import annotations

import math
from typing import Any

from app.core.errors import InvalidOption, PayloadError

__all__ = [
    "MAX_DELAY_S", "MAX_DEPTH", "MAX_JOB_ID_LEN", "MAX_TIMEOUT_S",
    "check_depth", "validate_delay", "validate_job_id", "validate_timeout",
]

MAX_DELAY_S = 365 * 24 * 3600.0
MAX_TIMEOUT_S = 365 * 24 * 3600.0
MAX_DEPTH = 100
MAX_JOB_ID_LEN = 256


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise InvalidOption(f"{name} must be a number of seconds, not {_short(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidOption(f"{name} must be a number of seconds, not {_short(value)}") from None
    if not math.isfinite(number):
        raise InvalidOption(f"{name} must be a finite number of seconds, not {_short(value)}")
    return number


def validate_delay(value: Any) -> float:
    """A delay in seconds: finite, >= 0, at most 365 days. Returns it as a float."""
    delay = _number(value, "delay")
    if delay < 0:
        raise InvalidOption(f"delay must be 0 or more seconds, not {_short(value)}")
    if delay > MAX_DELAY_S:
        raise InvalidOption(f"delay must be at most {MAX_DELAY_S:.0f} seconds (365 days), not {_short(value)}")
    return delay


def validate_timeout(value: Any) -> float:
    """A timeout in seconds: finite, > 0, at most 365 days. Returns it as a float."""
    timeout = _number(value, "timeout")
    if timeout <= 0:
        raise InvalidOption(f"timeout must be more than 0 seconds, not {_short(value)}")
    if timeout > MAX_TIMEOUT_S:
        raise InvalidOption(f"timeout must be at most {MAX_TIMEOUT_S:.0f} seconds (365 days), not {_short(value)}")
    return timeout


def validate_job_id(value: Any) -> str:
    """A caller-chosen job id: a non-empty str, valid UTF-8 text, no control characters."""
    if not isinstance(value, str):
        raise InvalidOption(f"job id must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidOption("job id must not be empty")
    if len(value) > MAX_JOB_ID_LEN:
        raise InvalidOption(f"job id must be at most {MAX_JOB_ID_LEN} characters, not {len(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidOption(
            "job id must be valid text (it holds an undecodable byte or a lone surrogate): use letters, digits, - _ . :"
        ) from None
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise InvalidOption("job id must not hold control characters: use letters, digits, - _ . :")
    return value


def check_depth(obj: Any, limit: int = MAX_DEPTH) -> None:
    """Refuse lists/dicts nested deeper than ``limit`` levels (checked iteratively, so any
    depth is refused cleanly instead of raising RecursionError)."""
    stack: list[tuple[Any, int]] = [(obj, 0)]
    seen: set[int] = set()
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple, dict)):
            depth += 1
            if depth > limit:
                raise PayloadError(
                    f"arguments are nested more than {limit} levels deep: flatten them or pass a reference"
                )
            if id(item) in seen:  # a cycle: json.dumps refuses it with its own message
                continue
            seen.add(id(item))
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth) for child in children)
