"""Every Redis key the layer writes, in one place (prefix ``WORKER_KEY_PREFIX``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "worker"

    @property
    def events(self) -> str:
        """The lifecycle event stream."""
        return f"{self.prefix}:events"

    def job(self, job_id: str) -> str:
        """Hash: status, attempt, queue, task, envelope, owner worker."""
        return f"{self.prefix}:job:{job_id}"

    def result(self, job_id: str) -> str:
        """JSON result of a finished job, with a TTL."""
        return f"{self.prefix}:result:{job_id}"

    def delayed(self, queue: str) -> str:
        """Sorted set of envelopes scored by the unix ms at which they become due."""
        return f"{self.prefix}:delayed:{queue}"

    def delayed_wake(self, queue: str) -> str:
        """List of wake-up tokens for the queue's delayed movers: pushed when an entry becomes
        the earliest of the delayed set, popped (BLPOP) by an idle mover (at most one kept)."""
        return f"{self.prefix}:delayed-wake:{queue}"

    def heartbeat(self, queue: str, worker_id: str) -> str:
        return f"{self.prefix}:heartbeat:{queue}:{worker_id}"

    @property
    def workers(self) -> str:
        """Sorted set of '<queue>|<worker_id>' scored by last beat (ms): who has been seen."""
        return f"{self.prefix}:workers"

    def engines(self, queue: str) -> str:
        """Hash engine -> last beat (ms) of any worker serving the queue on that engine."""
        return f"{self.prefix}:engines:{queue}"

    def held(self, instance: str) -> str:
        """Set of job ids one worker process (instance) is running now, for crash recovery."""
        return f"{self.prefix}:held:{instance}"

    @property
    def instances(self) -> str:
        """Sorted set of '<queue>|<instance>' scored by last beat (ms): what the reaper watches.

        An instance is one life of one worker process (worker id + a random suffix), so a
        process restarted under the same ``--id`` never inherits, or hides, a dead one's jobs."""
        return f"{self.prefix}:instances"

    def lock(self, name: str) -> str:
        return f"{self.prefix}:lock:{name}"

    def engine_namespace(self, engine: str) -> str:
        """Where an engine keeps its own keys, so one prefix isolates a whole deployment."""
        return f"{self.prefix}:{engine}"
