"""REDIS_SOCKET_TIMEOUT on async clients, kept by one watchdog per event loop."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.core import redis_cancel
from tests.faults import TcpProxy


async def test_a_blackholed_call_times_out_and_the_client_recovers(redis_url: str) -> None:
    proxy = TcpProxy(redis_url).start()
    client = aioredis.from_url(proxy.url, socket_timeout=1.0)
    try:
        await client.set("deadline-probe", 1)
        proxy.cut("blackhole")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RedisTimeoutError):
            await client.get("deadline-probe")
        took = loop.time() - started
        assert 0.9 <= took < 1.0 + 5 * redis_cancel.CHECK_EVERY_S + 2  # the deadline, a watchdog tick late at most
        proxy.restore()
        assert await client.get("deadline-probe") == b"1"
    finally:
        await client.aclose()
        proxy.stop()


async def test_a_blocking_read_shorter_than_the_deadline_is_left_alone(redis_url: str) -> None:
    client = aioredis.from_url(redis_url, socket_timeout=1.0)
    try:
        assert await client.blpop(["deadline-empty-list"], timeout=0.5) is None
        assert not any(redis_cancel._watched.get(asyncio.get_running_loop(), ()))
    finally:
        await client.aclose()
