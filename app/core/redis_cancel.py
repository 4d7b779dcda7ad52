"""Keep redis-py's asyncio writes from swallowing a task's cancellation on Python 3.11.

With ``socket_timeout`` set (see ``app.core.redis``), redis-py 5.x sends every command
through ``asyncio.wait_for``. Before Python 3.12, ``wait_for`` returns the inner result when
the outer task is cancelled in the same loop iteration the inner write completes, and the
cancellation is lost (CPython gh-86296). A write completes almost at once, so the window is
wide: a worker stopping while Redis went away lost the cancel of arq's consume loop, which
then polled forever, and a job's timeout or a drain can be lost the same way.

The fix is the same write under ``asyncio.timeout``, which tells its own cancellation from
anyone else's. It replaces ``send_packed_command`` on redis-py's asyncio connection base
class, so every async client in the process gets it: the layer's and the ones arq and
taskiq-redis build for themselves (a ``connection_class`` argument cannot reach those on
``rediss://``, where the URL picks the class). Applied only before Python 3.12 and only to
the redis-py line it was written against.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable
from typing import Any

import redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


async def _send_packed_command(
    self: Any, command: bytes | str | Iterable[bytes], check_health: bool = True
) -> None:
    """redis-py 5.3's ``AbstractConnection.send_packed_command`` with ``asyncio.timeout``
    in place of ``asyncio.wait_for``."""
    if not self.is_connected:
        await self.connect()
    elif check_health:
        await self.check_health()
    try:
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        async with asyncio.timeout(self.socket_timeout):
            self._writer.writelines(command)
            await self._writer.drain()
    except TimeoutError:  # asyncio's, from the deadline above
        await self.disconnect(nowait=True)
        raise RedisTimeoutError("Timeout writing to socket") from None
    except OSError as e:
        await self.disconnect(nowait=True)
        if len(e.args) == 1:
            err_no, errmsg = "UNKNOWN", e.args[0]
        else:
            err_no, errmsg = e.args[0], e.args[1]
        raise RedisConnectionError(f"Error {err_no} while writing to socket. {errmsg}.") from e
    except BaseException:
        # A send cut short leaves the stream in an unknown state: drop the connection.
        await self.disconnect(nowait=True)
        raise


def apply() -> bool:
    """Install the fix where it is needed; True when installed."""
    if sys.version_info >= (3, 12) or not redis.__version__.startswith("5."):
        return False
    AbstractConnection.send_packed_command = _send_packed_command  # type: ignore[method-assign]
    return True


APPLIED = apply()
