"""Fault helpers for tests: a TCP proxy that can cut one process off from Redis, and restore it.

Put a worker behind ``TcpProxy`` (its ``REDIS_URL`` pointing at ``proxy.url``) while others talk
to Redis directly: ``cut()`` is a network partition of that worker alone. Two ways to cut:

- ``"close"``: every connection is reset and new ones are closed at once (the peer learns at
  once: a Redis restart, a firewall that rejects);
- ``"blackhole"``: connections stay open but bytes go nowhere, and new ones are accepted and
  left silent (a half-open connection, a firewall that drops: only client timeouts notice).

``restore()`` forwards again for new connections; connections cut in ``blackhole`` mode stay
dead, as they would on a real network. The proxy runs its own event loop on a thread, so a
test may block (``wait_until``, ``subprocess``) without stalling it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

CHUNK = 65536


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TcpProxy:
    def __init__(self, target_url: str, port: int | None = None) -> None:
        """``target_url`` is a redis:// URL; the proxy listens on 127.0.0.1:``port`` (a free one
        by default) and ``url`` is the same URL pointing at the proxy."""
        parts = urlsplit(target_url)
        self.target_host = parts.hostname or "127.0.0.1"
        self.target_port = parts.port or 6379
        self.port = port or free_port()
        netloc = f"{parts.username or ''}{':' + parts.password if parts.password else ''}"
        netloc = f"{netloc}@" if netloc else ""
        self.url = urlunsplit((parts.scheme, f"{netloc}127.0.0.1:{self.port}", parts.path, parts.query, ""))
        self.mode: str | None = None  # None: forwarding; "close" or "blackhole": cut
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._dead: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()  # blackholed for good
        self._silent: set[asyncio.StreamWriter] = set()

    # -- control, from the test's thread -------------------------------------------------------

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def cut(self, mode: str = "close") -> None:
        """Partition: see the module docstring for ``mode``."""
        if mode not in ("close", "blackhole"):
            raise ValueError("mode is 'close' or 'blackhole'")
        self._call(self._cut(mode))

    def blackhole(self) -> None:
        """``cut("blackhole")``: the name the chaos tests use."""
        self.cut("blackhole")

    def restore(self) -> None:
        self._call(self._restore())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- the proxy, on its own loop ------------------------------------------------------------

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _cut(self, mode: str) -> None:
        self.mode = mode
        if mode == "blackhole":
            self._dead.update(self._conns)
            return
        for client, upstream in list(self._conns):
            _abort(client)
            _abort(upstream)
        self._conns.clear()

    async def _restore(self) -> None:
        self.mode = None

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for client, upstream in list(self._conns):
            _abort(client)
            _abort(upstream)
        for writer in list(self._silent):
            _abort(writer)
        self._conns.clear()
        self._silent.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "close":
            _abort(writer)
            return
        if self.mode == "blackhole":
            await self._swallow(reader, writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            _abort(writer)
            return
        pair = (writer, up_writer)
        self._conns.add(pair)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, pair), self._pipe(up_reader, writer, pair))
        finally:
            self._conns.discard(pair)
            self._dead.discard(pair)
            _abort(writer)
            _abort(up_writer)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: Any) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if self.mode == "blackhole" or pair in self._dead:
                    continue  # bytes go nowhere; the connection stays open (and dead after a restore)
                if self.mode == "close":
                    break
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            _abort(writer)

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._silent.add(writer)
        try:
            while await reader.read(CHUNK):
                pass
        except OSError:
            pass
        finally:
            self._silent.discard(writer)
            _abort(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    if not transport.is_closing():
        transport.abort()


# -- faults of the Redis server itself (a test-private redis-server: app.core.redis_server) ------

def freeze(server: Any) -> None:
    """Stop the redis-server process (SIGSTOP): connections stay open, nothing answers."""
    os.kill(server.process.pid, signal.SIGSTOP)


def thaw(server: Any) -> None:
    os.kill(server.process.pid, signal.SIGCONT)


def squeeze_memory(client: Any, margin: int = 64 * 1024) -> int:
    """``maxmemory`` just above what Redis uses now, with ``noeviction``: writes that need
    more memory are refused with OOM. ``client`` is a sync redis client. Returns the limit."""
    used = int(client.info("memory")["used_memory"])
    limit = used + margin
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", limit)
    return limit


def free_memory(client: Any) -> None:
    client.config_set("maxmemory", 0)


class Producer:
    """Enqueues one job per ``enqueue(n)`` call until stopped, through a failover or a cut:
    remembers which enqueues returned (in order) and counts the refused ones by error type."""

    def __init__(self, enqueue: Callable[[int], Awaitable[Any]], pause: float = 0.0) -> None:
        self.enqueue = enqueue
        self.pause = pause
        self.returned: list[str] = []
        self.errors: Counter[str] = Counter()
        self.stopped = False

    async def run(self) -> None:
        from app.core.errors import AppError

        n = 0
        while not self.stopped:
            n += 1
            try:
                job = await self.enqueue(n)
            except AppError as exc:
                self.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.02)
                continue
            self.returned.append(job.job_id)
            if self.pause:
                await asyncio.sleep(self.pause)

    async def wait_for(self, count: int, timeout: float = 30) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.returned) < count:
            assert loop.time() < deadline, f"only {len(self.returned)} enqueues returned, errors {dict(self.errors)}"
            await asyncio.sleep(0.01)
