"""Every Redis key the layer writes, in one place (prefix ``WORKER_KEY_PREFIX``).

On Redis Cluster (``REDIS_CLUSTER=true``) every key of one queue lives under that queue's hash
tag: ``Keys.for_queue(q)`` is a ``Keys`` whose prefix is ``<prefix>:{q}``, so the job hash is
``<prefix>:{q}:job:<id>``, the events stream ``<prefix>:{q}:events``, the engine's namespace
``<prefix>:{q}:taskiq``..., and each script or pipeline of a queue touches one slot while
queues spread over the masters. On a single Redis ``for_queue`` is the deployment's ``Keys``
itself: nothing moves there. ``of_queue`` names the same keys on both (``<prefix>:{q}:...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Keys:
    prefix: str = "worker"
    cluster: bool = False  # REDIS_CLUSTER: a queue's keys live under its hash tag (for_queue)
    root: str = ""  # the deployment's prefix, when this is one queue's Keys on Cluster

    @classmethod
    def from_settings(cls, settings: Any) -> Keys:
        return cls(settings.worker_key_prefix, bool(getattr(settings, "redis_cluster", False)))

    @property
    def base(self) -> str:
        """The deployment's prefix (``WORKER_KEY_PREFIX``), whichever queue this Keys is for."""
        return self.root or self.prefix

    def for_queue(self, queue: str) -> Keys:
        """The keys of one queue: under ``<prefix>:{<queue>}`` on Cluster, else this Keys."""
        if not self.cluster:
            return self
        return Keys(f"{self.base}:{{{queue}}}", True, self.base)

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

    def enqueue_chain(self, token: str) -> str:
        """Hash of one bulk enqueue's chunks (``last`` applied position, and each applied
        position's flags), kept ten minutes: see components/worker/bulk.py."""
        return f"{self.prefix}:enqueue:{token}"

    @property
    def queues(self) -> str:
        """Set of the queue names a deployment on Redis Cluster has used (workers add theirs at
        start, producers on first use): where readers find each queue's stream and workers."""
        return f"{self.base}:queues"

    def lock(self, name: str) -> str:
        return f"{self.prefix}:lock:{name}"

    # Keys of one queue's routing and dead letters carry the queue's hash tag ``{<queue>}``,
    # so on Redis Cluster all of them land in one slot and a script may touch several.

    def of_queue(self, queue: str, what: str) -> str:
        """``<prefix>:{<queue>}:<what>``: a key of one queue, in that queue's hash slot."""
        return f"{self.base}:{{{queue}}}:{what}"

    def route(self, queue: str) -> str:
        """Hash of the queue's routing state: ``paused`` (1 while paused), ``routed`` (1 once any
        job of the queue needed routing: from then on every job goes through admission)."""
        return self.of_queue(queue, "route")

    def ready(self, queue: str, group: str = "") -> str:
        """Sorted set of routed envelopes waiting for a worker of ``group`` ('' = the default
        group), scored by priority band then sequence: strict priority, FIFO within a level."""
        return self.of_queue(queue, f"ready:{group or '-'}")

    def ready_selector(self, queue: str, selector: str) -> str:
        """Like ``ready`` for jobs that target a label selector (canonical ``k=v,k=v``)."""
        return self.of_queue(queue, f"ready-sel:{selector}")

    def groups(self, queue: str) -> str:
        """Set of the worker groups that have (or had) a ready set in the queue ('-': default)."""
        return self.of_queue(queue, "groups")

    def limited(self, queue: str) -> str:
        """Set of the ready sets of rate-limited tasks ('ready:<group>|<task>' and
        'ready-sel:<selector>|<task>'): each such task waits in a set of its own, so a task at
        its limit is passed over as a whole and the others go on."""
        return self.of_queue(queue, "limited")

    def selectors(self, queue: str) -> str:
        """Set of the label selectors that have (or had) a ready set in the queue."""
        return self.of_queue(queue, "selectors")

    def sequence(self, queue: str) -> str:
        """Counter giving routed entries their FIFO order."""
        return self.of_queue(queue, "seq")

    def ready_wake(self, queue: str, group: str | None = None) -> str:
        """List of wake-up tokens for the queue's admitters: ``group`` None is the list every
        admitter of the queue listens to (a selector's job is ready, a lease was freed, the queue
        was resumed); a group's own list ('' = the default group) wakes only that group's
        admitters, so a token is not spent by a worker that cannot take the job."""
        if group is None:
            return self.of_queue(queue, "ready-wake")
        return self.of_queue(queue, f"ready-wake:{group or '-'}")

    def leases(self, queue: str) -> str:
        """Hash job id -> instance: the jobs of the queue running now under ``max_concurrency``."""
        return self.of_queue(queue, "leases")

    def members(self, queue: str) -> str:
        """Hash instance -> JSON {group, labels} of the queue's worker instances (for targets)."""
        return self.of_queue(queue, "members")

    def rate(self, queue: str, task: str) -> str:
        """Sorted set of recent starts of one rate-limited task (a sliding window)."""
        return self.of_queue(queue, f"rate:{task}")

    def dead(self, queue: str) -> str:
        """Sorted set of job ids that ended failed after their last attempt, scored by the
        finish time (ms, Redis's clock); kept ``WORKER_DEAD_TTL_SECONDS``."""
        return self.of_queue(queue, "dead")

    def overseer(self, what: str) -> str:
        """Keys of the dashboard (app/components/overseer): ``counters`` (job counts and run-time
        histograms folded from the event stream, with the id folded up to), ``minutes``
        (completed/failed per queue and minute, for the charts)."""
        return f"{self.prefix}:overseer:{what}"

    def engine_namespace(self, engine: str) -> str:
        """Where an engine keeps its own keys, so one prefix isolates a whole deployment."""
        return f"{self.prefix}:{engine}"
