"""Dramatiq messages stranded in a LIVE instance's acks set, and their put-back.

Dramatiq's fetch is one script: it pops ids off the queue and adds them to the fetching
instance's acks set, then replies with them. If the reply is lost (Redis restarted, a socket
timeout, a failover), the ids stay in the acks set while no thread of the instance has them.
redis-py even hides the loss: the broker's client retries a command whose connection closed,
so the consumer gets the *next* messages and never sees an error. Nobody runs the stranded
ones: Dramatiq's requeue and the reaper (``recover``) only free the acks of dead instances,
and this instance may live for weeks.

``Stranded`` keeps the ids this process holds (fetched, not yet acked, nacked or handed back:
a set operation per message, no Redis command) and, when asked, puts back the others. Asked
when it may be needed: any connection failure of the broker's client (``NoticeFailures``,
retried or not), any Redis error in the consumer, a new master under Sentinel. It runs on the
consumer thread between two fetches, the only thread that fetches, so no fetch of this
process is under way: an id in the acks set that is not held is stranded. Each goes back only
if still in the set (dramatiq_putback.lua), so one acked or handed back meanwhile stays put.
Cost: one SMEMBERS after a connection failure.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import redis
from redis.retry import Retry

from app.components.worker.engines.base import WAKE_TOKENS, WAKE_TTL_MS
from app.components.worker.runtime import scripts

logger = logging.getLogger(__name__)


class NoticeFailures(Retry):
    """A connection's retry policy that reports each failure to ``notice`` first (a command
    whose connection failed may have run without its reply arriving); retrying is ``inner``'s.
    redis-py deep-copies the policy into every connection: the copies share ``notice``."""

    def __init__(self, inner: Retry, notice: Callable[[], object]) -> None:  # no super().__init__: all is inner's
        self.inner = inner
        self.notice = notice

    def __deepcopy__(self, memo: dict[int, Any]) -> NoticeFailures:
        return NoticeFailures(copy.deepcopy(self.inner, memo), self.notice)

    def __getattr__(self, name: str) -> Any:
        if name == "inner" or name.startswith("__"):  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def update_supported_errors(self, specified_errors: list[Any]) -> None:
        self.inner.update_supported_errors(specified_errors)

    def call_with_retry(self, do: Callable[[], Any], fail: Callable[[Exception], Any]) -> Any:
        def failed(error: Exception) -> Any:
            self.notice()
            return fail(error)

        return self.inner.call_with_retry(do, failed)


def notice_failures(client: redis.Redis, notice: Callable[[], object]) -> None:
    """Make every connection ``client`` opens from now on report its failures to ``notice``."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)  # none on Cluster
    if kwargs is not None and kwargs.get("retry") is not None:
        kwargs["retry"] = NoticeFailures(kwargs["retry"], notice)


class Stranded:
    def __init__(self, client: redis.Redis, queue_name: str) -> None:
        self.client = client
        self.queue_name = queue_name
        self.held: set[str] = set()  # redis ids this process fetched and still owes an ack or hand-back
        self.returned = 0
        self._noticed = False  # a failure was seen: put back before the next fetch (nobody waits)
        self._waiters: list[concurrent.futures.Future[int]] = []
        self._lock = threading.Lock()
        self._script = client.register_script(scripts.source("dramatiq_putback"))

    # -- bookkeeping, on any thread (single set operations: atomic under the GIL) -------------

    def fetched(self, ids: Iterable[str]) -> None:
        self.held.update(ids)

    def released(self, ids: Iterable[str]) -> None:
        self.held.difference_update(ids)

    # -- the put-back ---------------------------------------------------------------------------

    def notice(self) -> None:
        """A connection failed (any thread): a fetch's reply may be lost."""
        self._noticed = True

    def request(self) -> concurrent.futures.Future[int]:
        """Ask for a put-back before the consumer's next fetch; the future gets its count."""
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        with self._lock:
            self._waiters.append(future)
        return future

    @property
    def due(self) -> bool:
        return self._noticed or bool(self._waiters)

    def put_back(self, acks: str, queue: str, wake: str) -> int:
        """On the consumer thread, between fetches: put back what the acks set has and this
        process does not hold. A failure leaves the requests pending (the next try serves them)."""
        with self._lock:
            waiters, self._waiters = self._waiters, []
            self._noticed = False  # before SMEMBERS: a failure from now on asks again
        try:
            recorded = [m.decode() if isinstance(m, bytes) else m for m in self.client.smembers(acks)]
            stranded = [i for i in recorded if i not in self.held]  # read after SMEMBERS's reply
            count = int(self._script(keys=[acks, queue, wake], args=[WAKE_TOKENS, WAKE_TTL_MS, *stranded])) \
                if stranded else 0
        except BaseException:
            with self._lock:
                self._waiters[:0] = waiters
                self._noticed = True
            raise
        if count:
            self.returned += count
            logger.warning("queue %s: %d message(s) recorded as fetched by this worker but held by none of its "
                           "threads (a fetch's reply lost with its connection) put back on the queue",
                           self.queue_name, count)
        for future in waiters:
            if future.set_running_or_notify_cancel():
                future.set_result(count)
        return count
