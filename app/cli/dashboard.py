"""`app dashboard`: the Overseer web dashboard and /metrics, served by uvicorn."""

from __future__ import annotations

import ipaddress
import socket
from typing import Annotated

import typer

from app.cli.common import fail, guarded, settings

SHUTDOWN_GRACE_S = 2


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def dashboard(
    host: Annotated[str, typer.Option(help="Address to bind; other than loopback only with DASHBOARD_TOKEN set.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
) -> None:
    """Serve the live dashboard (queues, workers, events, jobs, dead letters) and /metrics."""
    cfg = settings()
    from app.core.redis_cluster import DASHBOARD, refuse_feature

    guarded(refuse_feature)(cfg, DASHBOARD)
    token = cfg.dashboard_token.get_secret_value() if cfg.dashboard_token is not None else ""
    if not token and not is_loopback(host):
        fail(f"refusing to serve on {host} without DASHBOARD_TOKEN: set DASHBOARD_TOKEN, or bind to 127.0.0.1")
    _check_port(host, port)
    import uvicorn

    from app.components.overseer import create_app

    mode = "actions need the token" if token else "read-only: set DASHBOARD_TOKEN to allow actions"
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"dashboard on http://{shown}:{port}/ ({mode}), metrics on /metrics")
    try:
        # SSE connections never end by themselves: on SIGTERM they get a short grace, then are
        # closed, and the browsers reconnect (to this dashboard restarted, or another replica).
        uvicorn.run(create_app(cfg), host=host, port=port, log_level="warning", access_log=False,
                    timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port or stop what uses it")


def _check_port(host: str, port: int) -> None:
    """A port in use is one line and exit 2, before uvicorn starts (it would log and exit 3)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host.strip("[]"), port))
    except OSError as exc:
        fail(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port or stop what uses it")
