"""`app worker QUEUE`: serve one queue, in this process or under a supervisor."""

from __future__ import annotations

from typing import Annotated

import typer

from app.cli.common import fail, guarded, settings
from app.components.worker.config import resolve
from app.components.worker.registry import Registry
from app.components.worker.routing.options import check_group
from app.core.errors import AppError
from app.core.lifeline import die_with_parent
from app.core.logging import setup_logging
from app.core.settings import ENGINES, parse_labels


@guarded
def worker(
    queue: Annotated[str | None, typer.Argument(help="Queue to serve (default: WORKER_QUEUE_TYPE).")] = None,
    backend: Annotated[str | None, typer.Option(help="Engine: arq, dramatiq or taskiq.")] = None,
    processes: Annotated[int | None, typer.Option(min=1, help="Worker processes (WORKER_PROCESSES).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Job slots per process (WORKER_THREADS).")] = None,
    worker_id: Annotated[str | None, typer.Option("--id", help="Worker id (default hostname@pid).")] = None,
    label: Annotated[list[str] | None, typer.Option(help="Label k=v; repeatable.")] = None,
    group: Annotated[str | None, typer.Option(help="Worker group to join (WORKER_GROUP): jobs that target it "
                                              "run only here.")] = None,
    reload: Annotated[bool, typer.Option(help="Restart when code changes (development).")] = False,
    scheduler: Annotated[bool, typer.Option("--scheduler", help="Also run the schedules (see `app schedules`).")] = False,
) -> None:
    """Serve one queue: PROCESSES x THREADS concurrent jobs on the queue's engine."""
    die_with_parent()  # started by `app dev`, a supervisor or the reloader: do not outlive it
    cfg = settings()
    if backend is not None and backend.lower() not in ENGINES:
        fail(f"--backend {backend!r} is invalid: use one of {', '.join(ENGINES)}")
    backend = backend.lower() if backend else None
    queue_name = queue or cfg.worker_queue_type
    registry = Registry.discover(cfg.queue_packages)
    spec = registry.queue(queue_name)
    labels = parse_labels(label or [])
    if group is not None:
        try:
            group = check_group(group.strip(), "--group") if group.strip() else ""
        except AppError as exc:
            fail(str(exc))
    effective = resolve(spec, cfg, backend=backend, processes=processes, threads=threads, group=group)
    if cfg.redis_cluster:  # once here, not in each supervised child
        from app.core.redis_cluster import refuse_engine

        refuse_engine(effective.engine, spec.name)
    if scheduler:
        from app.components.scheduler import collect

        collect(registry, cfg.worker_schedules_file)  # a bad schedule: one line now, not in the worker
    setup_logging()
    if reload:
        from app.components.worker.reload import run_with_reload

        code = run_with_reload(cfg.worker_shutdown_timeout)
        if code:
            raise typer.Exit(code)
        return
    from app.components.worker.process import WorkerOptions, run

    options = WorkerOptions(queue=spec.name, backend=effective.engine, threads=effective.threads,
                            worker_id=worker_id or cfg.worker_id, labels=labels, group=effective.group,
                            scheduler=scheduler)
    if effective.processes == 1:
        run(cfg, registry, options)
    else:
        from app.components.worker.engine_switch import ensure_engine_free
        from app.components.worker.supervisor import supervise

        ensure_engine_free(cfg, spec.name, effective.engine)  # refused once, not per restarted child

        code = supervise(options, effective.processes)
        if code:
            raise typer.Exit(code)
