"""The engine contract (tests/test_contract.py) on Redis Cluster, for the engines that run there.

The same test functions, imported, with this module's fixtures: ``redis_url`` is the private
3-master cluster's (tests/cluster.py), ``env`` adds REDIS_CLUSTER=true, and ``start_worker``
waits for the heartbeat under the queue's hash tag. 15 of its 18 cases: those that read
only what the API shows (results, statuses, the event trail); the three left out read
single-Redis key names directly (a result key's TTL, an adapter built on the deployment's keys,
foreign messages written into the engine's keys). The cluster's own cases are in test_cluster.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.cluster import Cluster, ClusterWorkers, cluster_env, redis_cluster  # noqa: F401 - the session fixture
from tests.conftest import WorkerProcess
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
def env(redis_cluster: Cluster, prefix: str) -> dict[str, str]:  # noqa: F811
    return cluster_env(redis_cluster, prefix)


@pytest.fixture
def start_worker(env: dict[str, str], redis_cluster: Cluster, prefix: str) -> Iterator[Callable[..., WorkerProcess]]:  # noqa: F811
    workers = ClusterWorkers(redis_cluster, env, prefix)

    def start(queue: str = "contract", engine: str = "taskiq", *extra: str, wait: bool = True,
              **env_extra: str) -> WorkerProcess:
        return workers.start(queue, engine, *extra, wait=wait, **env_extra)

    yield start
    workers.stop_all()
