"""Every Redis key of workflows, under the layer's prefix.

A run's own keys carry the run id as a hash tag (``<prefix>:wf:{<run_id>}:...``), so on Redis
Cluster they share a slot; the indexes across runs are single keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.components.worker.keys import Keys

GROUP = "workflows"  # the consumer group of the events stream that advances runs


@dataclass(frozen=True)
class FlowKeys:
    keys: Keys

    def _run(self, run_id: str, what: str) -> str:
        return f"{self.keys.prefix}:wf:{{{run_id}}}:{what}"

    def run(self, run_id: str) -> str:
        """Hash: status, definition, params, one ``s:<step>`` JSON state and ``o:<step>`` output per step."""
        return self._run(run_id, "run")

    def items(self, run_id: str, step: str) -> str:
        """List: the items of a parallel step, JSON each (written once when the step starts)."""
        return self._run(run_id, f"items:{step}")

    def outputs(self, run_id: str, step: str) -> str:
        """Hash: item index -> JSON output of a parallel step's finished items."""
        return self._run(run_id, f"out:{step}")

    def lock(self, run_id: str) -> str:
        """Who advances the run now (a token, with a lease)."""
        return self._run(run_id, "lock")

    def dirty(self, run_id: str) -> str:
        """Set when someone wanted to advance the run while it was locked: the holder goes again."""
        return self._run(run_id, "dirty")

    @property
    def active(self) -> str:
        """Set of run ids not yet ended (queued, running, cancelling): what the sweep advances."""
        return f"{self.keys.prefix}:wf:active"

    @property
    def runs(self) -> str:
        """Sorted set run id -> creation time (ms): ``app workflow list``."""
        return f"{self.keys.prefix}:wf:runs"

    def running(self, workflow: str) -> str:
        """Set of a workflow's runs that hold one of its ``max_active_runs`` slots."""
        return f"{self.keys.prefix}:wf:running:{workflow}"

    @property
    def wake(self) -> str:
        """List: a token pushed when a run starts, so an idle reconciler starts reading events
        at once instead of at its next sweep (one token kept)."""
        return f"{self.keys.prefix}:wf:wake"

    @property
    def sweep(self) -> str:
        """Lock: one sweep of all active runs per interval, whoever takes it."""
        return f"{self.keys.prefix}:wf:sweep"
