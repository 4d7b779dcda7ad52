"""Deadlines for redis-py's asyncio calls: one watchdog per event loop, not a timer per command.

``socket_timeout`` (``REDIS_SOCKET_TIMEOUT``) must bound every Redis call: a paused Redis or a
half-open connection would otherwise hang a job's finish until the kernel gives up. redis-py
5.x enforces it by arming an ``asyncio`` timer around every read and every write; measured
on a no-op drain, those timers cost 12-15% of the layer's throughput. Here a call only notes
its deadline on its connection (two attribute writes and a set insertion), and one callback
per event loop, every ``CHECK_EVERY_S``, aborts the transport of a connection whose call is
past its deadline. The pending read then fails at once and is reported as redis-py's own
``TimeoutError``, so callers see what they saw before (and do not retry it). A deadline
fires up to ``CHECK_EVERY_S`` late, which is immaterial against a 10 s timeout.

It also keeps writes from swallowing a task's cancellation on Python 3.11: redis-py's
``asyncio.wait_for`` returns the inner result when the outer task is cancelled in the same
loop iteration the write completes (CPython gh-86296), which hung worker shutdowns; no
``wait_for`` is used here.

An explicit ``timeout=`` passed to ``read_response`` (redis-py's pub/sub polling) keeps
redis-py's own behaviour. Installed on redis-py's asyncio connection base class, so the
clients arq and taskiq-redis build for themselves get it too; only for the redis-py line it
was written against (5.x).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable
from typing import Any

import redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

CHECK_EVERY_S = 0.25

_original_read_response = AbstractConnection.read_response
_watched: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[Any]] = weakref.WeakKeyDictionary()


def _check(loop: asyncio.AbstractEventLoop, calls: set[Any]) -> None:
    now = loop.time()
    for conn in list(calls):
        deadline = getattr(conn, "_app_deadline", None)
        if deadline is not None and now >= deadline:
            calls.discard(conn)
            conn._app_deadline = None
            conn._app_expired = True
            writer = getattr(conn, "_writer", None)
            if writer is not None:
                writer.transport.abort()
    if calls:
        loop.call_later(CHECK_EVERY_S, _check, loop, calls)
    else:
        _watched.pop(loop, None)


def _arm(conn: Any) -> set[Any]:
    loop = asyncio.get_running_loop()
    calls = _watched.get(loop)
    if calls is None:
        calls = _watched[loop] = set()
        loop.call_later(CHECK_EVERY_S, _check, loop, calls)
    conn._app_expired = False
    conn._app_deadline = loop.time() + conn.socket_timeout
    calls.add(conn)
    return calls


def _disarm(conn: Any, calls: set[Any]) -> bool:
    """Stop watching; True when the watchdog fired for this call."""
    calls.discard(conn)
    conn._app_deadline = None
    return bool(getattr(conn, "_app_expired", False))


async def _read_response(self: Any, disable_decoding: bool = False, timeout: float | None = None, **kwargs: Any) -> Any:
    if timeout is not None or self.socket_timeout is None:
        return await _original_read_response(self, disable_decoding, timeout, **kwargs)
    calls = _arm(self)
    try:
        # With no socket timeout on the connection, redis-py reads without a timer.
        saved, self.socket_timeout = self.socket_timeout, None
        try:
            return await _original_read_response(self, disable_decoding, None, **kwargs)
        finally:
            self.socket_timeout = saved
    except (RedisConnectionError, OSError):
        if _disarm(self, calls):
            raise RedisTimeoutError(f"Timeout reading from {self._host_error()}") from None
        raise
    finally:
        _disarm(self, calls)


async def _send_packed_command(self: Any, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
    """redis-py 5.3's ``AbstractConnection.send_packed_command`` with the watchdog's deadline."""
    if not self.is_connected:
        await self.connect()
    elif check_health:
        await self.check_health()
    if isinstance(command, str):
        command = command.encode()
    if isinstance(command, bytes):
        command = [command]
    calls = _arm(self) if self.socket_timeout is not None else None
    try:
        self._writer.writelines(command)
        await self._writer.drain()
    except OSError as e:
        expired = calls is not None and _disarm(self, calls)
        await self.disconnect(nowait=True)
        if expired:
            raise RedisTimeoutError("Timeout writing to socket") from None
        if len(e.args) == 1:
            err_no, errmsg = "UNKNOWN", e.args[0]
        else:
            err_no, errmsg = e.args[0], e.args[1]
        raise RedisConnectionError(f"Error {err_no} while writing to socket. {errmsg}.") from e
    except BaseException:
        # A send cut short leaves the stream in an unknown state: drop the connection.
        if calls is not None:
            _disarm(self, calls)
        await self.disconnect(nowait=True)
        raise
    finally:
        if calls is not None:
            _disarm(self, calls)


def apply() -> bool:
    """Install on redis-py 5.x; True when installed."""
    if not redis.__version__.startswith("5."):
        return False
    AbstractConnection.send_packed_command = _send_packed_command  # type: ignore[method-assign]
    AbstractConnection.read_response = _read_response  # type: ignore[method-assign]
    return True


APPLIED = apply()
