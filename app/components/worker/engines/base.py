"""What an engine adapter must do natively: transport, pickup, per-process concurrency.

Everything else (attempts, retries, delays, timeouts, results, events, duplicate guard)
is the runtime's. An adapter carries the layer's JSON envelope as the single argument of
one dispatcher function named ``app.run``, and acks a message when ``handle`` returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.core.settings import Settings
from app.components.worker.config import QueueConfig
from app.components.worker.keys import Keys

Handle = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class EngineStats:
    ready: int
    running: int
    dead: int


class EngineAdapter(ABC):
    name: str

    def __init__(self, settings: Settings, keys: Keys, config: QueueConfig) -> None:
        self.settings = settings
        self.keys = keys
        self.config = config

    @abstractmethod
    async def send(self, messages: list[tuple[str, str]]) -> None:
        """Put (message id, envelope JSON) pairs on the queue for immediate pickup."""

    @abstractmethod
    async def start(self, handle: Handle) -> None:
        """Start consuming in this process, calling ``handle`` for each message."""

    @abstractmethod
    async def stop_fetching(self) -> None:
        """Take no new messages; running ones go on."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections (after running jobs were drained)."""

    @abstractmethod
    async def stats(self) -> EngineStats:
        """Counts read from the engine's own keys."""
