"""What an engine adapter must do natively: transport, pickup, per-process concurrency.

Everything else (attempts, retries, delays, timeouts, results, events, duplicate guard)
is the runtime's. An adapter carries the layer's JSON envelope as the single argument of
one dispatcher function named ``app.run``, and acks a message when ``handle`` returns.

Idle workers do not poll: the engines that have no blocking read (arq, Dramatiq) wait on a
small wake-up list ``<prefix>:<engine>:<queue>:wake`` with ``BLPOP``; whatever puts messages
on the queue (``stage``) also pushes up to ``WAKE_TOKENS`` tokens there. A worker checks the
queue at least every ``WORKER_IDLE_POLL_MS`` anyway, for messages that arrive another way.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from app.components.worker.config import QueueConfig
from app.components.worker.keys import Keys
from app.core.settings import Settings

Handle = Callable[[str], Awaitable[None]]
T = TypeVar("T")
logger = logging.getLogger(__name__)

WAKE_TOKENS = 64  # at most this many idle workers woken per batch, and tokens kept while all are busy
WAKE_TTL_MS = 60_000  # tokens nobody took (no idle worker) are dropped after this
IDLE_WAIT_S = 1.0  # default longest idle wait between checks of the queue


SETTLE_S = 5.0  # a restarted consumer counts as running again once it has lasted this long


@dataclass
class ConsumerState:
    """What the heartbeat reports about an engine's consume loop: ``running``, or
    ``restarting`` with the error that stopped it. A worker whose consumer is not running is
    alive but consumes nothing, and health must say so (an arq worker under an ACL without
    ``INFO`` restarts its consumer forever while its heartbeat looks fine)."""

    state: str = "running"
    error: str = ""
    restarts: int = 0

    def restarting(self, exc: BaseException) -> None:
        self.state, self.error = "restarting", f"{type(exc).__name__}: {exc}"[:300]
        self.restarts += 1

    def running(self) -> None:
        self.state, self.error = "running", ""

    def as_dict(self) -> dict[str, str]:
        return {"consumer": self.state, "consumer_error": self.error}


async def keep_running(
    name: str, serve: Callable[[], Awaitable[None]], done: Callable[[], bool], state: ConsumerState | None = None,
) -> None:
    """Run an engine's consume loop; when it dies (Redis down), restart it with backoff
    (1 s, doubling to 60 s) instead of leaving a live process that consumes nothing.
    ``state`` (the adapter's ``consumer``) says ``restarting`` from a failure until a restarted
    loop has lasted ``SETTLE_S``: a loop that dies at once on every start never looks running."""
    delay = 1.0
    state = state if state is not None else ConsumerState()
    while not done():
        task = asyncio.ensure_future(serve())
        try:
            if state.state != "running":
                finished, _ = await asyncio.wait({task}, timeout=SETTLE_S)
                if not finished:
                    state.running()
                    logger.warning("%s consumer running again after %d restart(s)", name, state.restarts)
            await task
            delay = 1.0
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        except Exception as exc:  # noqa: BLE001
            if done():
                return
            state.restarting(exc)
            logger.warning("%s consumer stopped (%s: %s); restarting in %.0fs", name, type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)


class Coalescer(Generic[T]):
    """Engine writes of many jobs issued in the same event-loop turn go to Redis in one
    pipeline (acks, arq's clean-up of a finished job): with N slots, jobs end in bursts, and
    one round trip per burst replaces one per job. ``stage(pipe, items)`` adds the commands
    for the items of one burst; each caller waits for that pipeline and gets its error, as it
    would from its own call."""

    def __init__(self, client: Callable[[], Any], stage: Callable[[Any, list[T]], None], *,
                 transaction: bool = False) -> None:
        self.client = client
        self.stage = stage
        self.transaction = transaction
        self._items: list[T] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, item: T) -> None:
        """Send ``item`` with the others of this loop turn; return once the pipeline succeeded."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not self._items:
            loop.call_soon(self._spawn)
        self._items.append(item)
        self._waiters.append(future)
        await future

    def _spawn(self) -> None:
        task = asyncio.ensure_future(self._flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        items, waiters = self._items, self._waiters
        self._items, self._waiters = [], []
        try:
            async with self.client().pipeline(transaction=self.transaction) as pipe:
                self.stage(pipe, items)
                await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - every caller gets the error
            for future in waiters:
                if not future.done():
                    future.set_exception(exc)
            return
        for future in waiters:
            if not future.done():
                future.set_result(None)


def stand_in(reason: str, data: Any) -> str:
    """The argument handed to the runtime for a message the layer did not write (or cannot
    read): ``<reason: data>``. The runtime fails it with MalformedMessage and a job.failed
    event, and the adapter then removes it from the engine's keys like any finished message."""
    shown = data[:200] if isinstance(data, (bytes, str)) else data
    return f"<{reason}: {shown!r:.300}>"


@dataclass(frozen=True)
class EngineStats:
    """Counts from the engine's own keys. ``running``: messages taken off the queue by a
    worker (fetched, prefetched or running: engines cannot tell these apart cheaply)."""

    ready: int
    running: int
    dead: int


class EngineAdapter(ABC):
    name: str

    def __init__(self, settings: Settings, keys: Keys, config: QueueConfig) -> None:
        self.settings = settings
        self.keys = keys
        self.config = config
        self.consumer = ConsumerState()
        self._redis: Any = None

    @property
    def namespace(self) -> str:
        """Where this engine keeps its keys: under the layer's prefix, like every key."""
        return self.keys.engine_namespace(self.name)

    @property
    def wake_key(self) -> str:
        return f"{self.namespace}:{self.config.name}:wake"

    @property
    def idle_wait(self) -> float:
        """Seconds an idle worker blocks waiting for a wake-up (``WORKER_IDLE_POLL_MS``),
        kept well inside the socket timeout so a blocking read is never taken for a dead link."""
        wait = (self.settings.worker_idle_poll_ms or IDLE_WAIT_S * 1000) / 1000
        return max(0.001, min(wait, getattr(self.settings, "redis_socket_timeout", 10.0) / 2))

    def stage_wake(self, pipe: Any, count: int) -> None:
        """Wake up to ``count`` idle workers (on ``pipe``, in the same round trip as the messages)."""
        pipe.lpush(self.wake_key, *[b"1"] * max(1, min(count, WAKE_TOKENS)))
        pipe.ltrim(self.wake_key, 0, WAKE_TOKENS - 1)
        pipe.pexpire(self.wake_key, WAKE_TTL_MS)

    def consumer_state(self) -> dict[str, str]:
        """The consume loop's state for the heartbeat: ``{"consumer": "running"|"restarting",
        "consumer_error": "..."}``. Adapters that run their loop through ``keep_running(...,
        state=self.consumer)`` get it for free; others override this."""
        return self.consumer.as_dict()

    @abstractmethod
    async def stage(self, pipe: Any, messages: list[tuple[str, str]]) -> None:
        """Queue on ``pipe`` (an async Redis pipeline) the commands that put (message id,
        envelope JSON) pairs on the queue, in the engine's own format, and wake idle workers:
        the producer sends them with the layer's job records in one round trip."""

    async def send(self, messages: list[tuple[str, str]]) -> None:
        """Put messages on the queue now, in one pipeline."""
        async with self.redis.pipeline(transaction=False) as pipe:
            await self.stage(pipe, messages)
            await pipe.execute()

    @property
    def redis(self) -> Any:
        """An async client for the engine's keys (the producer and the delayed mover)."""
        if self._redis is None:
            from app.core.redis import async_client

            self._redis = async_client(self.settings)
        return self._redis

    async def close_redis(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @abstractmethod
    async def start(self, handle: Handle, instance: str) -> None:
        """Start consuming in this process, calling ``handle`` for each message.
        ``instance`` names this consumer where the engine tracks consumers."""

    async def recover(self, dead_instance: str) -> int:
        """Return to the queue what an instance fetched but never finished, and forget the
        instance in the engine's keys; how many messages. Called by the reaper for a dead
        instance and by ``close`` for this one. Engines without prefetch (arq) need nothing."""
        return 0

    @abstractmethod
    async def stop_fetching(self) -> None:
        """Take no new messages; running ones go on."""

    @abstractmethod
    async def close(self) -> None:
        """Hand back what this process fetched and did not run, then release connections
        (after running jobs were drained)."""

    @abstractmethod
    async def stats(self) -> EngineStats:
        """Counts read from the engine's own keys, in O(1) or O(log n) commands."""
