"""The engine contract (tests/test_contract.py) on Redis Cluster, for the engines that run there.

The same test functions, imported, with this module's fixtures: ``redis_url`` is the private
3-master cluster's (tests/cluster.py), ``env`` adds REDIS_CLUSTER=true, and ``start_worker``
waits for the heartbeat under the queue's hash tag. 15 of its 18 cases: those that read
only what the API shows (results, statuses, the event trail); the three left out read
single-Redis key names directly (a result key's TTL, an adapter built on the deployment's keys,
foreign messages written into the engine's keys). The cluster's own cases are in test_cluster.py.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Iterator

import pytest
import redis

from tests.cluster import Cluster, redis_cluster  # noqa: F401 - the session fixture
from tests.conftest import BASE_ENV, ROOT, WorkerProcess, wait_until
from tests.test_contract import (  # noqa: F401 - collected here, run with this module's fixtures
    test_a_jobs_own_timeout_and_max_tries_win_over_the_tasks,
    test_async_and_sync_tasks_round_trip_json,
    test_delay_is_respected,
    test_duplicate_job_id_is_not_enqueued_twice,
    test_enqueue_many_in_bulk,
    test_environment_max_tries_beats_queue_setting,
    test_event_trail_of_a_job,
    test_job_context_is_the_same_on_every_engine,
    test_job_enqueued_before_any_worker_is_not_lost,
    test_producer_refuses_an_engine_no_worker_runs,
    test_retries_count_attempts_the_same_everywhere,
    test_timeout_fails_async_and_sync_jobs,
    test_unknown_task_or_queue_fails_at_enqueue,
    test_unserialisable_arguments_are_refused_at_enqueue,
    test_unserialisable_result_fails_the_job,
)

pytestmark = pytest.mark.parametrize("engine", ["taskiq", "dramatiq"])


@pytest.fixture
def redis_url(redis_cluster: Cluster) -> str:  # noqa: F811
    return redis_cluster.url


@pytest.fixture
def env(redis_url: str, prefix: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "REDIS_"))}
    out.update(BASE_ENV)
    out.update({"REDIS_URL": redis_url, "REDIS_CLUSTER": "true", "WORKER_KEY_PREFIX": prefix,
                "PYTHONPATH": str(ROOT), "WORKFLOW_RECONCILER": "false"})
    return out


@pytest.fixture
def start_worker(env: dict[str, str], redis_cluster: Cluster, prefix: str) -> Iterator[Callable[..., WorkerProcess]]:  # noqa: F811
    started: list[WorkerProcess] = []
    client = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.servers[0].port)

    def start(queue: str = "contract", engine: str = "taskiq", *extra: str, wait: bool = True,
              **env_extra: str) -> WorkerProcess:
        worker = WorkerProcess([queue, "--backend", engine, *extra], {**env, **{k.upper(): str(v) for k, v in env_extra.items()}})
        started.append(worker)
        if wait:
            beat = f"{prefix}:{{{queue}}}:heartbeat:{queue}:{socket.gethostname()}@{worker.proc.pid}"

            def beating() -> bool:
                if worker.proc.poll() is not None:
                    raise AssertionError(f"worker exited with {worker.proc.returncode}")
                return bool(client.exists(beat))

            wait_until(beating, 30, what=f"{engine} worker heartbeat")
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
    for worker in started:
        worker.stop(sig=None)
    client.close()
