"""`app workflow ...`: run a YAML workflow, look at runs, cancel, retry, reconcile."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from app.cli.common import fail, parse_pairs, print_json, run, settings

workflow_cli = typer.Typer(name="workflow", help="Workflows: steps that are jobs of any queue (Dagu's patterns).",
                           no_args_is_help=True)
T = TypeVar("T")


def _with_flows(body: Callable[[Any], Awaitable[T]]) -> T:
    from app.components.worker.api import WorkerClient
    from app.components.workflows import Workflows

    async def main() -> T:
        client = WorkerClient(settings())
        try:
            return await body(Workflows(client))
        finally:
            await client.close()

    return run(main)


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[:width - 3] + "..."


MARKS = {"completed": "[green]✓[/]", "failed": "[red]✗[/]", "skipped": "[dim]↷[/]", "running": "[yellow]▶[/]",
         "pending": "[dim]·[/]"}


def _draw(view: dict[str, Any]) -> None:
    """The run as a tree of its steps (each under the steps it depends on) with their states."""
    from rich.console import Console
    from rich.tree import Tree

    head = f"[bold]{view['workflow']}[/] run {view['run_id']}: {view['status']}"
    if view.get("error"):
        head += f" [red]({_short(view['error'], 100)})[/]"
    tree = Tree(head)
    steps = view["steps"]

    def line(name: str, s: dict[str, Any]) -> str:
        text = f"{MARKS.get(s['state'], '?')} {name} [dim]{s['kind']} {s['target'] or ''}[/] {s['state']}"
        if s["attempt"] > 1:
            text += f" (launch {s['attempt']})"
        if s.get("items"):
            i = s["items"]
            text += f" items {i['done']}/{i['total']} done, {i['failed']} failed, {i['running']} running"
        if s.get("duration_ms") is not None and s["state"] != "skipped":
            text += f" {s['duration_ms']} ms"
        if s.get("error"):
            text += f" [red]{_short(s['error'], 80)}[/]"
        elif s.get("skipped_because"):
            text += f" [dim]({_short(s['skipped_because'], 80)})[/]"
        elif s.get("output") is not None:
            text += f" → {_short(s['output'])}"
        return text

    nodes = {}
    for name, s in steps.items():
        parent = nodes.get(s["depends"][0]) if s["depends"] else None
        label = line(name, s) + (f" [dim](after {', '.join(s['depends'])})[/]" if len(s["depends"]) > 1 else "")
        nodes[name] = (parent or tree).add(label)
    if view["status"] == "completed":
        tree.add(f"output → {_short(view['output'], 100)}")
    Console().print(tree)


@workflow_cli.command("run")
def run_cmd(
    file: Annotated[Path, typer.Argument(help="The workflow's YAML file.")],
    params: Annotated[list[str] | None, typer.Argument(help="Params as KEY=VALUE, after --.")] = None,
    run_id: Annotated[str | None, typer.Option("--run-id", help="Choose the run id (refused while that run is active).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the run to end (and advance it from here too).")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout", help="With --wait: give up after S seconds.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Start a run of a YAML workflow: `app workflow run FILE.yaml [-- KEY=VALUE ...] [--wait]`."""
    from app.components.workflows import load_file

    async def body(flows: Any) -> None:
        wf = load_file(file)
        rid = await flows.start(wf, parse_pairs(params or []), run_id)
        if not wait:
            print_json({"run_id": rid}) if as_json else typer.echo(rid)
            return
        view = await flows.wait(rid, timeout, drive=True)
        if as_json:
            print_json(view)
        else:
            _draw(view)
        if view["status"] != "completed":
            raise typer.Exit(1)

    _with_flows(body)


@workflow_cli.command()
def status(
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """A run and each of its steps: state, attempt, duration, output or error."""
    view = _with_flows(lambda flows: flows.status(run_id))
    print_json(view) if as_json else _draw(view)


@workflow_cli.command()
def cancel(run_id: Annotated[str, typer.Argument(help="The run's id.")]) -> None:
    """Cancel a run: what has not started never starts; running steps finish."""
    state = _with_flows(lambda flows: flows.cancel(run_id))
    typer.echo(f"run {run_id}: {state}")


@workflow_cli.command()
def retry(run_id: Annotated[str, typer.Argument(help="The run's id.")]) -> None:
    """Retry a failed or cancelled run from its failed steps (completed steps keep their outputs)."""
    _with_flows(lambda flows: flows.retry(run_id))
    typer.echo(f"run {run_id}: retrying from its failed steps")


@workflow_cli.command("list")
def list_cmd(
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many runs, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Recent runs, newest first."""
    rows = _with_flows(lambda flows: flows.list(limit))
    if as_json:
        print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("run id", "workflow", "status", "created", "finished", "error")
    for r in rows:
        table.add_row(r["run_id"], r["workflow"], r["status"], _when(r["created"]), _when(r["finished"]),
                      _short(r["error"] or "", 60))
    Console().print(table)


@workflow_cli.command()
def reconcile(
    sweep: Annotated[float | None, typer.Option("--sweep", help="Seconds between sweeps (WORKFLOW_SWEEP_SECONDS).")] = None,
) -> None:
    """Advance workflow runs in this process until stopped (workers do it too, unless
    WORKFLOW_RECONCILER=false)."""
    from app.components.workflows import Reconciler

    async def main() -> None:
        rec = Reconciler(settings(), sweep_seconds=sweep).start()
        typer.echo(f"advancing workflow runs (consumer {rec.consumer}); Ctrl-C to stop", err=True)
        try:
            await asyncio.Event().wait()
        finally:
            await rec.stop()

    try:
        run(main)
    except KeyboardInterrupt:
        pass


__all__ = ["fail", "workflow_cli"]
