"""References inside step fields: ``${PARAM}``, ``${step.output}``, ``${step.output.field}``,
``${ITEM}`` / ``${ITEM.field}``.

A string that is exactly one reference becomes the referenced value itself (a list stays a
list, a number a number); a reference inside a longer string is rendered as text (strings
as they are, anything else as JSON). Resolution is pure: it reads a context built from the
run's params, the outputs of finished steps and the current item.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

REF = re.compile(r"\$\{([^{}]*)\}")
ITEM = "ITEM"


@dataclass(frozen=True)
class Ref:
    """One parsed reference: ``kind`` is param, output or item; ``path`` the fields after it."""

    text: str
    kind: str
    name: str
    path: tuple[str, ...]


class RefError(ValueError):
    """A reference that cannot be parsed or resolved; the message names it."""


def parse(text: str) -> Ref:
    parts = text.strip().split(".")
    if not all(parts):
        raise RefError(f"reference ${{{text}}} is malformed: write ${{PARAM}}, ${{step.output}} or ${{step.output.field}}")
    if parts[0] == ITEM:
        return Ref(text, "item", ITEM, tuple(parts[1:]))
    if len(parts) == 1:
        return Ref(text, "param", parts[0], ())
    if parts[1] not in ("output", "outputs"):  # Dagu writes ${STEP.outputs.FIELD}
        raise RefError(f"reference ${{{text}}} is malformed: a step's value is ${{{parts[0]}.output}}")
    return Ref(text, "output", parts[0], tuple(parts[2:]))


def refs_in(value: Any) -> list[Ref]:
    """Every reference in a value (strings inside lists and dicts too)."""
    if isinstance(value, str):
        return [parse(m) for m in REF.findall(value)]
    if isinstance(value, dict):
        return [r for v in value.values() for r in refs_in(v)]
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in refs_in(v)]
    return []


@dataclass
class Context:
    params: dict[str, Any]
    outputs: dict[str, Any]
    item: Any = None

    def lookup(self, ref: Ref) -> Any:
        if ref.kind == "param":
            if ref.name not in self.params:
                raise RefError(f"${{{ref.text}}}: no param {ref.name!r}")
            value = self.params[ref.name]
        elif ref.kind == "item":
            value = self.item
        else:
            if ref.name not in self.outputs:
                raise RefError(f"${{{ref.text}}}: step {ref.name!r} has no output (it did not complete)")
            value = self.outputs[ref.name]
        for field in ref.path:
            value = _field(value, field, ref)
        return value


def _field(value: Any, field: str, ref: Ref) -> Any:
    if isinstance(value, dict) and field in value:
        return value[field]
    if isinstance(value, list) and field.lstrip("-").isdigit() and -len(value) <= int(field) < len(value):
        return value[int(field)]
    raise RefError(f"${{{ref.text}}}: no field {field!r} in {_short(value)}")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def text_of(value: Any) -> str:
    """How a value reads inside a string, and what a precondition compares."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def resolve(value: Any, ctx: Context) -> Any:
    """``value`` with every reference replaced (see the module docstring)."""
    if isinstance(value, str):
        whole = REF.fullmatch(value)
        if whole:
            return ctx.lookup(parse(whole.group(1)))
        return REF.sub(lambda m: text_of(ctx.lookup(parse(m.group(1)))), value)
    if isinstance(value, dict):
        return {k: resolve(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, ctx) for v in value]
    return value
