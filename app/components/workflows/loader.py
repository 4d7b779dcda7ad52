"""The YAML form of a workflow, with Dagu's field names where Dagu has one.

    name: etl
    params:
      - DAY: "2024-01-01"
    steps:
      - name: extract
        task: extract_rows
        kwargs: {day: "${DAY}"}
      - name: transform
        task: transform_chunk
        depends: extract
        parallel: ${extract.output.chunks}
        max_concurrent: 5
        kwargs: {chunk: "${ITEM}"}

A file may hold several documents (``---``): the first is the workflow to run, the others
are workflows its steps may ``run`` by name. ``run: other.yaml`` loads a file beside this one.
Every mistake is one ``WorkflowError`` line: ``FILE: workflow 'w', step 's': field: what to do``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from app.components.workflows.definition import ContinueOn, Precondition, Step, Workflow, WorkflowError

WORKFLOW_FIELDS = ("name", "params", "steps", "max_active_steps", "max_active_runs", "output", "description")
STEP_FIELDS = ("name", "task", "queue", "kwargs", "depends", "parallel", "max_concurrent", "run", "params",
               "preconditions", "continue_on", "retry", "timeout", "description")


def _unknown(what: str, key: Any, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
    return f"unknown field {key!r} in {what}{hint}"


class _Doc:
    """Errors of one document, prefixed with the file and the workflow/step being read."""

    def __init__(self, path: Path, name: str = "") -> None:
        self.path = path
        self.name = name

    def error(self, message: str, step: str | None = None, field: str | None = None) -> WorkflowError:
        where = [str(self.path)]
        if self.name:
            where.append(f"workflow {self.name!r}")
        if step is not None:
            where.append(f"step {step!r}")
        text = ", ".join(where) + ": " + (f"{field}: " if field else "") + message
        return WorkflowError(text)


def _params(doc: _Doc, raw: Any) -> dict[str, Any]:
    """Dagu's ``params``: a list of ``KEY: default`` (or bare ``KEY``), or one mapping."""
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return {str(k): v for k, v in raw.items()}
    if not isinstance(raw, list):
        raise doc.error("must be a list of KEY: default", field="params")
    out: dict[str, Any] = {}
    for item in raw:
        if isinstance(item, str):
            key, sep, value = item.partition("=")
            out[key.strip()] = value if sep else None
        elif isinstance(item, dict) and len(item) == 1:
            (key, value), = item.items()
            out[str(key)] = value
        else:
            raise doc.error(f"each item must be KEY: default, not {item!r}", field="params")
    return out


def _step(doc: _Doc, raw: Any, index: int, base: Path, seen: dict[Path, Workflow],
          extra: list[Workflow]) -> Step:
    if not isinstance(raw, dict):
        raise doc.error(f"steps[{index}] must be a mapping with name, task or run...", field="steps")
    name = raw.get("name")
    label = str(name) if name is not None else f"#{index + 1}"
    if name is None:
        raise doc.error("needs a name", step=label)
    for key in raw:
        if key not in STEP_FIELDS:
            raise doc.error(_unknown("a step", key, STEP_FIELDS), step=label)
    parallel = raw.get("parallel")
    max_concurrent = raw.get("max_concurrent", 10)
    if isinstance(parallel, dict):  # Dagu's long form: {items: ..., max_concurrent: N}
        for key in parallel:
            if key not in ("items", "max_concurrent"):
                raise doc.error(_unknown("parallel", key, ("items", "max_concurrent")), step=label, field="parallel")
        max_concurrent = parallel.get("max_concurrent", max_concurrent)
        parallel = parallel.get("items")
    preconditions = []
    for i, p in enumerate(raw.get("preconditions") or []):
        if not isinstance(p, dict) or set(p) != {"condition", "expected"}:
            raise doc.error("each item needs condition and expected (exact, or re:REGEX)", step=label,
                            field=f"preconditions[{i}]")
        preconditions.append(Precondition(str(p["condition"]), str(p["expected"])))
    cont = raw.get("continue_on") or {}
    if not isinstance(cont, dict) or any(k not in ("failure", "skipped") for k in cont):
        raise doc.error("must be a mapping of failure: true and/or skipped: true", step=label, field="continue_on")
    if any(not isinstance(v, bool) for v in cont.values()):
        raise doc.error("failure and skipped take true or false", step=label, field="continue_on")
    retry, interval = raw.get("retry", 0), 0.0
    if isinstance(retry, dict):  # Dagu's retryPolicy: {limit, interval_sec}
        if any(k not in ("limit", "interval_sec") for k in retry):
            raise doc.error(_unknown("retry", next(k for k in retry if k not in ("limit", "interval_sec")),
                                     ("limit", "interval_sec")), step=label, field="retry")
        retry, interval = retry.get("limit", 0), retry.get("interval_sec", 0.0)
    run = raw.get("run")
    if isinstance(run, str) and run.endswith((".yaml", ".yml")):
        try:
            child = load_file(base / run, seen=seen, extra=extra)
        except WorkflowError as exc:
            raise doc.error(str(exc), step=label, field="run") from None
        run = child.name
    elif run is not None and not isinstance(run, str):
        raise doc.error("must be a workflow file (.yaml), a workflow name, or a reference", step=label, field="run")
    depends = raw.get("depends") or []
    if not isinstance(depends, (str, list)) or (isinstance(depends, list) and not all(isinstance(d, str) for d in depends)):
        raise doc.error("must be a step name or a list of step names", step=label, field="depends")
    for field, value in (("kwargs", raw.get("kwargs")), ("params", raw.get("params"))):
        if value is not None and not isinstance(value, dict):
            raise doc.error("must be a mapping of name: value", step=label, field=field)
    return Step(
        name=str(name), task=raw.get("task"), queue=raw.get("queue"), kwargs=raw.get("kwargs") or {},
        depends=depends, parallel=parallel, max_concurrent=max_concurrent, run=run,
        params=_params(doc, raw.get("params")) if isinstance(raw.get("params"), list) else (raw.get("params") or {}),
        preconditions=preconditions, continue_on=ContinueOn(**cont), retry=retry, retry_interval=interval,
        timeout=raw.get("timeout"),
    )


def _workflow(doc: _Doc, raw: Any, base: Path, seen: dict[Path, Workflow], extra: list[Workflow]) -> Workflow:
    if not isinstance(raw, dict):
        raise doc.error("a workflow must be a mapping with name and steps")
    for key in raw:
        if key not in WORKFLOW_FIELDS:
            raise doc.error(_unknown("the workflow", key, WORKFLOW_FIELDS))
    doc.name = str(raw.get("name") or doc.path.stem)
    steps = raw.get("steps")
    if not isinstance(steps, list) or not steps:
        raise doc.error("must be a non-empty list of steps", field="steps")
    return Workflow(
        name=doc.name, steps=[_step(doc, s, i, base, seen, extra) for i, s in enumerate(steps)],
        params=_params(doc, raw.get("params")), max_active_steps=raw.get("max_active_steps"),
        max_active_runs=raw.get("max_active_runs"), output=raw.get("output"),
    )


def load_file(path: str | Path, *, seen: dict[Path, Workflow] | None = None,
              extra: list[Workflow] | None = None) -> Workflow:
    """The first workflow of a YAML file, with every workflow it can run attached, validated
    for structure (tasks are checked against a registry when a run starts)."""
    path = Path(path)
    top = seen is None
    seen = {} if seen is None else seen
    extra = [] if extra is None else extra
    resolved = path.resolve()
    if resolved in seen:
        return seen[resolved]
    try:
        text = path.read_text()
    except OSError as exc:
        raise WorkflowError(f"{path}: cannot read the workflow file ({exc.strerror or exc})") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise WorkflowError(f"{path}{line}: not valid YAML ({problem})") from None
    if not docs:
        raise WorkflowError(f"{path}: the file holds no workflow")
    workflows = []
    for i, raw in enumerate(docs):
        wf = _workflow(_Doc(path), raw, path.parent, seen, extra)
        if i == 0:
            seen[resolved] = wf
        workflows.append(wf)
    extra.extend(workflows)
    root = workflows[0]
    if top:
        root.workflows = [w for w in extra if w is not root]
        try:
            root.validate()
        except WorkflowError as exc:
            raise WorkflowError(f"{path}: {exc}") from None
    return root

