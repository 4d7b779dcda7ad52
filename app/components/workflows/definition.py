"""A workflow definition: steps, their dependencies, and what each one runs.

A step runs a task of any queue (hence any engine), or another workflow (``run``). Steps
form a DAG through ``depends``; a step may read the params of the run and the outputs of the
steps it depends on (directly or not) through references (see ``refs``). Everything that can
be checked before a run starts is checked by ``validate``, and each mistake is one
``WorkflowError`` line naming the workflow, the step and the field.

The definition travels as JSON (``to_dict`` / ``from_dict``): a run stores it in its hash,
so any process can advance the run without the Python objects or the YAML file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.components.workflows.refs import ITEM, RefError, refs_in
from app.core.errors import AppError

if TYPE_CHECKING:
    from app.components.worker.registry import Registry

STEP_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
WORKFLOW_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
DEFAULT_MAX_CONCURRENT = 10  # Dagu's default


class WorkflowError(AppError):
    """A workflow definition (or a request about a run) that cannot be used; one line."""


class RunNotFound(WorkflowError):
    exit_code = 1


@dataclass(frozen=True)
class Precondition:
    """Met when ``condition`` (with references resolved) equals ``expected``, or matches it as
    a regular expression when ``expected`` starts with ``re:`` (searched, as Dagu does)."""

    condition: str
    expected: str

    def met(self, value: str) -> bool:
        if self.expected.startswith("re:"):
            return re.search(self.expected[3:], value) is not None
        return value == self.expected


@dataclass(frozen=True)
class ContinueOn:
    failure: bool = False
    skipped: bool = False


@dataclass
class Step:
    name: str
    task: str | Callable[..., Any] | None = None
    queue: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    depends: list[str] | str = field(default_factory=list)
    parallel: list[Any] | str | None = None
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    run: Workflow | str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    preconditions: list[Precondition] = field(default_factory=list)
    continue_on: ContinueOn = field(default_factory=ContinueOn)
    retry: int = 0  # launches after the first when the step's job fails (each launch then has one try)
    retry_interval: float = 0.0
    timeout: float | None = None  # seconds from launch; a step still running then fails (StepTimeout)

    def __post_init__(self) -> None:
        if isinstance(self.depends, str):
            self.depends = [self.depends]
        self.depends = list(self.depends)
        self.preconditions = [p if isinstance(p, Precondition) else Precondition(**p) for p in self.preconditions]
        if isinstance(self.continue_on, dict):
            self.continue_on = ContinueOn(**self.continue_on)


@dataclass
class Workflow:
    name: str
    steps: list[Step]
    params: dict[str, Any] = field(default_factory=dict)
    max_active_steps: int | None = None
    max_active_runs: int | None = None
    output: Any = None  # what the run returns (references allowed); default: every step's output by name
    workflows: list[Workflow] = field(default_factory=list)  # runnable by name from a step's ``run``

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise WorkflowError(f"workflow {self.name!r} has no step {name!r}")

    def catalogue(self) -> dict[str, Workflow]:
        """Every workflow this one may run, by name, itself included (nested ones too)."""
        found: dict[str, Workflow] = {}

        def visit(wf: Workflow) -> None:
            if wf.name in found:
                if found[wf.name] is not wf and to_dict(found[wf.name]) != to_dict(wf):
                    raise WorkflowError(f"two different workflows are named {wf.name!r}: rename one")
                return
            found[wf.name] = wf
            for child in wf.workflows:
                visit(child)
            for s in wf.steps:
                if isinstance(s.run, Workflow):
                    visit(s.run)

        visit(self)
        return found

    def validate(self, registry: Registry | None = None) -> Workflow:
        """Check the whole definition (and the workflows it runs); with a registry, also that
        every task exists in its queue. Raises one WorkflowError; returns self."""
        catalogue = self.catalogue()
        for wf in catalogue.values():
            _validate(wf, catalogue, registry)
        return self


def _fail(wf: Workflow, step: Step | None, message: str) -> WorkflowError:
    where = f"workflow {wf.name!r}" + (f", step {step.name!r}" if step else "")
    return WorkflowError(f"{where}: {message}")


def _validate(wf: Workflow, catalogue: dict[str, Workflow], registry: Registry | None) -> None:
    if not WORKFLOW_NAME.match(wf.name or ""):
        raise WorkflowError(f"workflow name {wf.name!r} is invalid: use letters, digits, '_', '.', '-' (64 at most)")
    if not wf.steps:
        raise _fail(wf, None, "has no steps: add at least one under steps")
    for key in wf.params:
        if not PARAM_NAME.match(str(key)):
            raise _fail(wf, None, f"param name {key!r} is invalid: use letters, digits and '_' (not first a digit)")
    for limit in ("max_active_steps", "max_active_runs"):
        value = getattr(wf, limit)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise _fail(wf, None, f"{limit} must be a positive integer, not {value!r}")
    names: set[str] = set()
    for s in wf.steps:
        if not isinstance(s.name, str) or not STEP_NAME.match(s.name):
            raise WorkflowError(f"workflow {wf.name!r}: step name {s.name!r} is invalid: use letters, digits, "
                                "'_' and '-' (64 at most)")
        if s.name in names:
            raise _fail(wf, s, "name is used by two steps: rename one")
        names.add(s.name)
    for s in wf.steps:
        for dep in s.depends:
            if dep not in names:
                raise _fail(wf, s, f"depends on unknown step {dep!r} (steps: {', '.join(sorted(names))})")
            if dep == s.name:
                raise _fail(wf, s, "depends on itself")
    ancestors = _ancestors(wf)
    for s in wf.steps:
        _validate_step(wf, s, ancestors[s.name], catalogue, registry)
    for ref in _refs(wf, None, wf.output):
        if ref.kind == "output" and ref.name not in names:
            raise _fail(wf, None, f"output references ${{{ref.text}}}, but there is no step {ref.name!r}")
        _check_ref(wf, None, ref, names, "output")


def _ancestors(wf: Workflow) -> dict[str, set[str]]:
    """Every step's transitive dependencies; a cycle is an error naming a step on it."""
    deps = {s.name: s.depends for s in wf.steps}
    done: dict[str, set[str]] = {}
    visiting: list[str] = []

    def visit(name: str) -> set[str]:
        if name in done:
            return done[name]
        if name in visiting:
            cycle = visiting[visiting.index(name):] + [name]
            raise _fail(wf, wf.step(name), f"depends on itself through a cycle: {' -> '.join(cycle)}")
        visiting.append(name)
        found: set[str] = set()
        for dep in deps[name]:
            found |= {dep} | visit(dep)
        visiting.pop()
        done[name] = found
        return found

    for s in wf.steps:
        visit(s.name)
    return done


def _refs(wf: Workflow, step: Step | None, value: Any, field: str = "") -> list[Any]:
    try:
        return refs_in(value)
    except RefError as exc:
        raise _fail(wf, step, f"{field + ': ' if field else ''}{exc}") from None


def _check_ref(wf: Workflow, step: Step | None, ref: Any, visible: set[str], field: str) -> None:
    if ref.kind == "param" and ref.name not in wf.params:
        declared = ", ".join(sorted(wf.params)) or "none"
        raise _fail(wf, step, f"{field} references ${{{ref.text}}}, but the workflow has no param {ref.name!r} "
                              f"(declared: {declared}): declare it under params")
    if ref.kind == "output" and ref.name not in visible:
        raise _fail(wf, step, f"{field} references ${{{ref.text}}}, but {step.name if step else 'it'} does not "
                              f"depend on step {ref.name!r}: add it to depends")


def _validate_step(wf: Workflow, s: Step, visible: set[str], catalogue: dict[str, Workflow],
                   registry: Registry | None) -> None:
    if (s.task is None) == (s.run is None):
        raise _fail(wf, s, "needs exactly one of task (a task of a queue) or run (another workflow)")
    fields: list[tuple[str, Any]] = [("kwargs", s.kwargs), ("params", s.params),
                                     ("parallel", s.parallel if isinstance(s.parallel, str) else None),
                                     ("run", s.run if isinstance(s.run, str) else None)]
    fields += [(f"preconditions[{i}].condition", p.condition) for i, p in enumerate(s.preconditions)]
    for name, value in fields:
        for ref in _refs(wf, s, value, name):
            if ref.kind == "item" and s.parallel is None:
                raise _fail(wf, s, f"{name} references ${{{ref.text}}}, but the step has no parallel list")
            if ref.kind == "item" and name == "parallel":
                raise _fail(wf, s, "parallel cannot reference ${ITEM}")
            _check_ref(wf, s, ref, visible, name)
    if isinstance(s.parallel, str) and not _is_single_ref(s.parallel):
        raise _fail(wf, s, f"parallel must be a list or one reference like ${{step.output}}, not {s.parallel!r}")
    if s.parallel is not None and not isinstance(s.parallel, (list, str)):
        raise _fail(wf, s, f"parallel must be a list or one reference like ${{step.output}}, not {s.parallel!r}")
    if not isinstance(s.max_concurrent, int) or isinstance(s.max_concurrent, bool) or s.max_concurrent < 1:
        raise _fail(wf, s, f"max_concurrent must be a positive integer, not {s.max_concurrent!r}")
    if not isinstance(s.retry, int) or isinstance(s.retry, bool) or s.retry < 0:
        raise _fail(wf, s, f"retry must be a number of retries (0 or more), not {s.retry!r}")
    for name, value in (("timeout", s.timeout), ("retry_interval", s.retry_interval)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise _fail(wf, s, f"{name} must be a number of seconds, not {value!r}")
    if not isinstance(s.kwargs, dict) or not isinstance(s.params, dict):
        raise _fail(wf, s, "kwargs and params must be mappings of name: value")
    for i, p in enumerate(s.preconditions):
        if not isinstance(p.condition, str) or not isinstance(p.expected, str):
            raise _fail(wf, s, f"preconditions[{i}] needs condition and expected as strings")
        if p.expected.startswith("re:"):
            try:
                re.compile(p.expected[3:])
            except re.error as exc:
                raise _fail(wf, s, f"preconditions[{i}].expected is not a valid regular expression ({exc})") from None
    if s.run is not None:
        target = s.run.name if isinstance(s.run, Workflow) else s.run
        if not _is_single_ref(target) and target not in catalogue:
            known = ", ".join(sorted(catalogue)) or "none"
            raise _fail(wf, s, f"run names unknown workflow {target!r} (known: {known})")
        if not _is_single_ref(target):
            child = catalogue[target]
            for key in s.params:
                if key not in child.params:
                    raise _fail(wf, s, f"params sets {key!r}, but workflow {target!r} has no such param")
    if s.task is not None and registry is not None:
        try:
            spec = registry.task(s.task, s.queue)
        except AppError as exc:
            raise _fail(wf, s, str(exc)) from None
        s.task, s.queue = spec.name, spec.queue
    elif s.task is not None and not isinstance(s.task, str):
        raise _fail(wf, s, "a task given as a function needs a registry to find its name: validate(registry)")


def _is_single_ref(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"\$\{[^{}]*\}", value) is not None


# --- JSON form -------------------------------------------------------------------------------


def step_to_dict(s: Step) -> dict[str, Any]:
    return {
        "name": s.name, "task": s.task if isinstance(s.task, str) or s.task is None else s.task.__name__,
        "queue": s.queue, "kwargs": s.kwargs, "depends": list(s.depends), "parallel": s.parallel,
        "max_concurrent": s.max_concurrent, "run": s.run.name if isinstance(s.run, Workflow) else s.run,
        "params": s.params, "preconditions": [[p.condition, p.expected] for p in s.preconditions],
        "continue_on": [s.continue_on.failure, s.continue_on.skipped], "retry": s.retry,
        "retry_interval": s.retry_interval, "timeout": s.timeout,
    }


def to_dict(wf: Workflow) -> dict[str, Any]:
    """One workflow (not the ones it runs): JSON-ready."""
    return {"name": wf.name, "params": wf.params, "max_active_steps": wf.max_active_steps,
            "max_active_runs": wf.max_active_runs, "output": wf.output,
            "steps": [step_to_dict(s) for s in wf.steps]}


def catalogue_to_dict(wf: Workflow) -> dict[str, Any]:
    """A workflow and every workflow it may run: what a run stores."""
    return {"root": wf.name, "workflows": {name: to_dict(w) for name, w in wf.catalogue().items()}}


def from_dict(data: dict[str, Any]) -> Workflow:
    steps = [Step(name=s["name"], task=s["task"], queue=s["queue"], kwargs=s["kwargs"], depends=s["depends"],
                  parallel=s["parallel"], max_concurrent=s["max_concurrent"], run=s["run"], params=s["params"],
                  preconditions=[Precondition(c, e) for c, e in s["preconditions"]],
                  continue_on=ContinueOn(*s["continue_on"]), retry=s["retry"],
                  retry_interval=s["retry_interval"], timeout=s["timeout"])
             for s in data["steps"]]
    return Workflow(data["name"], steps, data["params"], data["max_active_steps"], data["max_active_runs"],
                    data["output"])


def order(wf: Workflow) -> list[Step]:
    """Steps in an order where each comes after what it depends on (stable)."""
    placed: list[Step] = []
    seen: set[str] = set()
    pending = list(wf.steps)
    while pending:
        rest = []
        for s in pending:
            if all(d in seen for d in s.depends):
                placed.append(s)
                seen.add(s.name)
            else:
                rest.append(s)
        pending = rest
    return placed


def leaves(wf: Workflow) -> Iterable[Step]:
    used = {d for s in wf.steps for d in s.depends}
    return (s for s in wf.steps if s.name not in used)


__all__ = ["ITEM", "ContinueOn", "Precondition", "RunNotFound", "Step", "Workflow", "WorkflowError"]
