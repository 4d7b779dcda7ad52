"""``/metrics`` in Prometheus text format (prometheus-client), read from Redis at each scrape.

Nothing is counted in the dashboard's memory: job counts and run-time histograms come from
the counters ``fold.lua`` keeps in Redis, queue depths and worker states from the same reads
as ``app queues`` / ``app workers``. So the figures are right with any number of worker
processes and dashboard replicas, and survive a dashboard restart (the multiprocess mode of
prometheus-client is not needed: no process exposes its own counters).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from app.components.overseer import overview
from app.components.overseer.counters import BUCKETS_S, Counters, read_counters

STATES = ("healthy", "warning", "unhealthy", "offline", "stopped")
DEPTHS = ("ready", "delayed", "running", "failed", "dead")


class _Snapshot:
    """A collector over figures read before ``generate_latest`` runs (collect() is sync)."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics


def build(queues: list[dict[str, Any]], workers: list[dict[str, Any]], counters: Counters) -> list[Metric]:
    depth = GaugeMetricFamily("app_queue_jobs", "Jobs of a queue by state (ready, delayed, running, failed: kept "
                              "by the engine, dead: dead letters)", labels=["queue", "engine", "state"])
    paused = GaugeMetricFamily("app_queue_paused", "1 while the queue is paused", labels=["queue"])
    waiting = GaugeMetricFamily("app_queue_waiting", "Routed jobs waiting for admission, by worker group (or label "
                                "selector) and priority band", labels=["queue", "target", "priority"])
    for row in queues:
        if row.get("error"):
            continue
        counts = {**row, "failed": (row.get("failed") or 0) - (row.get("dead") or 0)}  # disjoint states
        for state in DEPTHS:
            depth.add_metric([row["queue"], row["engine"], state], float(counts.get(state) or 0))
        paused.add_metric([row["queue"]], 1.0 if row.get("paused") else 0.0)
        for target, bands in sorted((row.get("waiting_by_group") or {}).items()):
            for band in ("high", "low"):
                waiting.add_metric([row["queue"], target, band], float(bands.get(band, 0)))
    states = GaugeMetricFamily("app_workers", "Workers with a heartbeat, by health state",
                               labels=["queue", "engine", "state"])
    tally: dict[tuple[str, str, str], int] = {}
    for w in workers:
        key = (w["queue"], w["engine"], w["state"])
        tally[key] = tally.get(key, 0) + 1
    for queue, engine in sorted({(w["queue"], w["engine"]) for w in workers}):
        for state in STATES:
            states.add_metric([queue, engine, state], float(tally.get((queue, engine, state), 0)))
    jobs = CounterMetricFamily("app_jobs", "Job attempts ended, by outcome (completed, retried, failed, cancelled)",
                               labels=["queue", "task", "engine", "outcome"])
    enqueued = CounterMetricFamily("app_jobs_enqueued", "Jobs accepted", labels=["queue", "task", "engine"])
    for (queue, task, engine, outcome), count in sorted(counters.jobs.items()):
        if outcome == "enqueued":
            enqueued.add_metric([queue, task, engine], float(count))
        else:
            jobs.add_metric([queue, task, engine, outcome], float(count))
    runs = HistogramMetricFamily("app_job_run_seconds", "Run time of job attempts", labels=["queue", "task", "engine"])
    for labels, counts in sorted(counters.buckets.items()):
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, BUCKETS_S), "+Inf"], counts, strict=True):
            cumulative += count
            buckets.append((bound, float(cumulative)))
        runs.add_metric(list(labels), buckets, counters.sums_ms.get(labels, 0.0) / 1000)
    folded = CounterMetricFamily("app_events_counted", "Events of the stream folded into these counters")
    folded.add_metric([], float(counters.folded))
    out: list[Metric] = [depth, paused, waiting, states, jobs, enqueued, runs, folded]
    if counters.dropped is not None:
        dropped = CounterMetricFamily("app_events_dropped", "Events trimmed from the stream (WORKER_EVENTS_MAXLEN) "
                                      "before they were counted")
        dropped.add_metric([], float(counters.dropped))
        out.append(dropped)
    return out


async def exposition(overseer: Any) -> bytes:
    client = overseer.client
    await overseer.fold()
    metrics = build(await overview.queues(client, overseer.adapters), await overview.workers(client), await read_counters(client.redis, client.keys))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(metrics))
    return generate_latest(registry)
