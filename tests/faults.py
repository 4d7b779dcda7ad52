"""Fault injection for the chaos tests: a TCP proxy that partitions one client from Redis,
and faults of the Redis server itself (frozen process, memory full).

The proxy runs its own event loop on a daemon thread, so a test that blocks its loop (or a
worker under test) never slows the forwarding. API, shared by the chaos and liveness tests:

    proxy = TcpProxy(port_of_redis).start()   # proxy.url -> redis://127.0.0.1:<proxy port>
    proxy.cut()        # close every connection and refuse new ones (the peer sees a reset)
    proxy.blackhole()  # connections stay open but no byte moves either way (a partition:
                       # bytes wait in the kernel, as with packets TCP keeps retransmitting)
    proxy.restore()    # forward again; bytes held by a blackhole are delivered, in order
    proxy.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from typing import Any

from app.core.redis_server import RedisServer, free_port


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1", port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._open: asyncio.Event | None = None
        self._refusing = False
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0  # accepted since start, for tests that check a client reconnected

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _call(self, fn: Any) -> Any:
        async def run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def start(self) -> TcpProxy:
        self._thread.start()

        async def listen() -> None:
            self._open = asyncio.Event()
            self._open.set()
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

        asyncio.run_coroutine_threadsafe(listen(), self.loop).result(10)
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            _abort(writer)
            return
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(writer)
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                _abort(w)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._open is not None
        try:
            while True:
                await self._open.wait()
                data = await reader.read(65536)
                if not data:
                    break
                await self._open.wait()  # a blackhole holds what was read until restore
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            _abort(writer)

    def cut(self) -> None:
        """Reset every connection through the proxy and refuse new ones until ``restore``."""
        def do() -> None:
            self._refusing = True
            for w in list(self._writers):
                _abort(w)
        self._call(do)

    def blackhole(self) -> None:
        """Stop moving bytes both ways; connections (old and new) stay open and silent."""
        self._call(lambda: self._open.clear())  # type: ignore[union-attr]

    def restore(self) -> None:
        def do() -> None:
            self._refusing = False
            self._open.set()  # type: ignore[union-attr]
        self._call(do)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                _abort(w)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close at once with a reset, as a dead peer or a killed proxy does."""
    transport = writer.transport
    if not transport.is_closing():
        transport.abort()


def freeze(server: RedisServer) -> None:
    """Stop the redis-server process (SIGSTOP): connections stay open, nothing answers."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)


def thaw(server: RedisServer) -> None:
    assert server.process is not None
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
