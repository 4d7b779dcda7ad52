"""Redis Cluster (REDIS_CLUSTER=true) on a private 3-master cluster (tests/cluster.py).

Three queues whose hash tags land on three different masters (checked with CLUSTER KEYSLOT
and CLUSTER SLOTS) run jobs on each engine that supports Cluster; results are read by job id
alone; a failing job is retried then failed with its events in its queue's stream; a
SIGKILLed worker's job comes back through another worker; arq is refused in one line.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app.components.worker.api import JobRequest, WorkerClient
from app.components.worker.events import read_events_of
from app.core.errors import ConfigError, JobFailed, NotReplicated
from app.core.settings import load_settings
from tests.cluster import Cluster, ClusterWorkers, cluster_env, redis_cluster  # noqa: F401 - the session fixture
from tests.conftest import ROOT, WorkerProcess, until

QUEUES = ("mail", "images", "billing")  # tags {mail} {images} {billing}: slots 4247, 9450, 12682
CLUSTER_ENGINES = ["taskiq", "dramatiq"]
TIMEOUT = 30
FAST = {"WORKER_OFFLINE_AFTER": "1.5", "WORKER_WARNING_AFTER": "0.5", "WORKER_UNHEALTHY_AFTER": "1"}


@pytest.fixture
def cprefix() -> str:
    return f"c{uuid.uuid4().hex[:8]}"


@pytest.fixture
def cenv(redis_cluster: Cluster, cprefix: str) -> dict[str, str]:  # noqa: F811
    return cluster_env(redis_cluster, cprefix, WORKER_QUEUE_PACKAGES="tests.cluster_queues")


@pytest.fixture
def cluster_client(redis_cluster: Cluster) -> Iterator[redis.RedisCluster]:  # noqa: F811
    client = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.servers[0].port)
    yield client
    client.close()


def _settings(cenv: dict[str, str], **overrides: Any) -> Any:
    values = {k.lower(): v for k, v in cenv.items() if k.startswith(("WORKER_", "REDIS_", "WORKFLOW_"))}
    values.update(overrides)
    return load_settings(_env_file=None, **values)


@pytest.fixture
async def cclient(cenv: dict[str, str], engine: str) -> Any:
    client = WorkerClient(_settings(cenv, worker_backend=engine))
    yield client
    await client.close()


@pytest.fixture
def start(redis_cluster: Cluster, cenv: dict[str, str], cprefix: str) -> Iterator[Callable[..., WorkerProcess]]:  # noqa: F811
    """Start ``app worker QUEUE --backend ENGINE`` on the cluster; wait for its heartbeat."""
    workers = ClusterWorkers(redis_cluster, cenv, cprefix)
    yield workers.start
    workers.stop_all()


def app(cenv: dict[str, str], *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], env={**cenv, **extra_env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


async def trail(client: WorkerClient, job_id: str, last: str) -> list[dict[str, str]]:
    async def ended() -> list[dict[str, str]] | None:
        events = [e async for e in read_events_of(client.redis, client.keys, sorted(client.registry.queues),
                                                  job_id=job_id)]
        return events if events and events[-1]["type"] == last else None

    return await until(ended, 10, what=f"trail of {job_id} ending with {last}")


def test_queues_land_on_three_masters(redis_cluster: Cluster, cluster_client: redis.RedisCluster, cprefix: str) -> None:  # noqa: F811
    """Every key of a queue shares its slot; the three queues' slots are served by three masters."""
    from app.components.worker.keys import Keys

    keys = Keys(cprefix, cluster=True)
    masters = {}
    for queue in QUEUES:
        qk = keys.for_queue(queue)
        names = [qk.job("j1"), qk.result("j1"), qk.events, qk.held("w~1"), qk.instances, qk.workers,
                 qk.heartbeat(queue, "w"), qk.delayed(queue), qk.route(queue), qk.dead(queue),
                 f"{qk.engine_namespace('taskiq')}:{queue}", f"{qk.engine_namespace('dramatiq')}:{queue}.msgs"]
        slots = {int(cluster_client.execute_command("CLUSTER KEYSLOT", name, target_nodes=cluster_client.RANDOM))
                 for name in names}
        assert len(slots) == 1, f"{queue}: keys in {len(slots)} slots"
        slot = slots.pop()
        ranges = cluster_client.execute_command("CLUSTER SLOTS", target_nodes=cluster_client.RANDOM)
        masters[queue] = next(int(master[1]) for low, high, master, *_ in _slot_ranges(ranges) if low <= slot <= high)
    assert len(set(masters.values())) == 3, masters
    assert Keys(cprefix).for_queue("mail") == Keys(cprefix)  # a single Redis: nothing moves
    assert keys.for_queue("mail").of_queue("mail", "route") == Keys(cprefix).of_queue("mail", "route")


def _slot_ranges(reply: Any) -> list[tuple[int, int, Any]]:
    """CLUSTER SLOTS as (low, high, master) whether redis-py parsed it (a dict) or not."""
    if isinstance(reply, dict):
        return [(low, high, ("127.0.0.1", node["primary"][1])) for (low, high), node in reply.items()]
    return [(int(r[0]), int(r[1]), r[2]) for r in reply]


@pytest.mark.parametrize("engine", CLUSTER_ENGINES)
async def test_jobs_run_on_every_master_with_results_by_id(
    engine: str, cenv: dict[str, str], cclient: WorkerClient, start: Any
) -> None:
    for queue in QUEUES:
        start(queue, engine)
    jobs = [await cclient.enqueue("add", n, 1, _queue=queue) for n, queue in enumerate(QUEUES)]
    many = await cclient.enqueue_many([JobRequest("add", (n, 10), queue=queue)  # one script call per queue
                                       for n, queue in enumerate(QUEUES * 2)])
    bad = await cclient.enqueue("always_fails", "no", _queue="billing")  # max_tries=2
    later = await cclient.enqueue("add", 20, 1, _queue="images", _delay=0.2)  # the delayed set and its mover
    routed = await cclient.enqueue("add", 30, 1, _queue="mail", _priority="high")  # admission (routing)
    other = WorkerClient(_settings(cenv))  # knows only ids: looks each up in every queue
    try:
        assert [await other.job(job.job_id).result(TIMEOUT) for job in jobs] == [1, 2, 3]
        assert [await other.job(job.job_id).result(TIMEOUT) for job in many if job] == [10, 11, 12, 13, 14, 15]
        with pytest.raises(JobFailed) as failed:
            await other.job(bad.job_id).result(TIMEOUT)
        assert failed.value.error_type == "ValueError"
        assert await other.job(jobs[1].job_id).status() == "completed"
        assert await other.job("no-such-job").status() == "unknown"
        assert [await other.job(job.job_id).result(TIMEOUT) for job in (later, routed)] == [21, 31]
    finally:
        await other.close()
    events = await trail(cclient, bad.job_id, "job.failed")
    assert [e["type"] for e in events] == ["job.enqueued", "job.started", "job.retried", "job.started", "job.failed"]
    assert {e["queue"] for e in events} == {"billing"}

    # The CLI readers read each queue's keys.
    shown = app(cenv, "result", jobs[2].job_id)
    assert shown.returncode == 0 and shown.stdout.strip() == "3", shown.stderr
    listed = [json.loads(line) for line in app(cenv, "events", "--json", "--job", bad.job_id).stdout.splitlines()]
    assert [e["type"] for e in listed] == [e["type"] for e in events]
    queues = {row["queue"]: row for row in json.loads(app(cenv, "queues", "--json").stdout)}
    assert all(queues[q]["workers"] == 1 and queues[q]["engine"] == engine for q in QUEUES), queues
    assert queues["billing"]["failed"] == 1
    workers = json.loads(app(cenv, "workers", "--json").stdout)
    assert sorted(w["queue"] for w in workers) == sorted(QUEUES)

    # Dead letters live in the failed job's queue slot; retry and purge find it by id alone.
    dead = json.loads(app(cenv, "dead", "--json").stdout)
    assert [(row["job_id"], row["queue"]) for row in dead] == [(bad.job_id, "billing")], dead
    retried = app(cenv, "dead", "retry", bad.job_id)
    assert retried.returncode == 0 and bad.job_id in retried.stdout, retried.stderr
    await until(lambda: _dead_ids(cenv, [bad.job_id]), TIMEOUT, what="retried job dead again")
    purged = app(cenv, "dead", "purge", "--job", bad.job_id)
    assert purged.returncode == 0 and "purged 1" in purged.stdout, purged.stderr
    assert json.loads(app(cenv, "dead", "--json").stdout) == []
    again = app(cenv, "dead", "purge", "--job", bad.job_id)
    assert again.returncode != 0 and "not in the dead set" in again.stderr and "Traceback" not in again.stderr


async def _dead_ids(cenv: dict[str, str], ids: list[str]) -> bool:
    rows = json.loads(app(cenv, "dead", "--json").stdout)
    return [row["job_id"] for row in rows] == ids and await _failed_twice(cenv, ids[0])


async def _failed_twice(cenv: dict[str, str], job_id: str) -> bool:
    listed = [json.loads(line) for line in app(cenv, "events", "--json", "--job", job_id).stdout.splitlines()]
    return [e["type"] for e in listed].count("job.failed") == 2


@pytest.mark.parametrize("engine", CLUSTER_ENGINES)
async def test_sigkilled_workers_job_comes_back(engine: str, cclient: WorkerClient, start: Any, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    doomed = start("images", engine, **FAST)
    job = await cclient.enqueue("wait_for_file", str(gate), _queue="images")
    await until(lambda: _status_is(job, "running"), what="job running")
    doomed.proc.send_signal(signal.SIGKILL)
    doomed.proc.wait(10)
    start("images", engine, **FAST)
    await until(lambda: _attempt(cclient, job.job_id, 2), what="redelivered as attempt 2")
    gate.write_text("go")
    assert await job.result(TIMEOUT) == "released"
    events = await trail(cclient, job.job_id, "job.completed")
    assert [e["type"] for e in events] == ["job.enqueued", "job.started", "job.retried", "job.started", "job.completed"]
    assert events[2]["error"].startswith("WorkerLost: ")


async def _status_is(job: Any, status: str) -> bool:
    return await job.status() == status


async def _attempt(client: WorkerClient, job_id: str, attempt: int) -> bool:
    keys, _ = await client.keys_of(job_id, None)
    record = await client.redis.hmget(keys.job(job_id), "status", "attempt")
    return record[0] == b"running" and int(record[1] or 0) == attempt


async def test_arq_and_deployment_wide_features_are_refused(cenv: dict[str, str]) -> None:
    worker = app(cenv, "worker", "mail", "--backend", "arq")
    assert worker.returncode == 2
    assert worker.stderr.strip().count("\n") == 0 and "arq" in worker.stderr and "taskiq" in worker.stderr, worker.stderr
    producer = app(cenv, "enqueue", "add", "--queue", "mail", "--", "a=1", "b=2", WORKER_BACKEND="arq")
    assert producer.returncode == 2 and "REDIS_CLUSTER=true" in producer.stderr and "Traceback" not in producer.stderr
    client = WorkerClient(_settings(cenv, worker_backend="arq"))
    try:
        with pytest.raises(ConfigError, match="arq#385"):
            await client.enqueue("add", 1, 2, _queue="mail")
    finally:
        await client.close()
    dashboard = app(cenv, "dashboard", "--port", "1")
    assert dashboard.returncode == 2 and "dashboard" in dashboard.stderr and "Traceback" not in dashboard.stderr
    flows = app(cenv, "workflow", "list")
    assert flows.returncode == 2 and "workflows" in flows.stderr and "Traceback" not in flows.stderr, flows.stderr


def test_unreachable_cluster_is_one_line(cenv: dict[str, str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = app(cenv, "queues", REDIS_URL=f"redis://127.0.0.1:{port}")
    assert done.returncode == 2 and done.stderr.startswith("error: cannot reach Redis"), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("extra", "says"), [
    ({"REDIS_SENTINELS": "127.0.0.1:1", "REDIS_SENTINEL_MASTER": "m"}, "REDIS_CLUSTER and REDIS_SENTINELS exclude"),
])
def test_cluster_with_sentinel_or_wait_is_one_line(cenv: dict[str, str], extra: dict[str, str], says: str) -> None:
    done = app(cenv, "queues", **extra)
    assert done.returncode == 2 and says in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_cluster_flag_on_a_single_redis_is_one_line(cenv: dict[str, str], redis_url: str) -> None:
    done = app(cenv, "queues", REDIS_URL=redis_url)
    assert done.returncode == 2 and "REDIS_CLUSTER" in done.stderr and "Traceback" not in done.stderr, done.stderr



async def test_schedules_fire_on_cluster(cenv: dict[str, str], start: Any, tmp_path: Path) -> None:
    """A schedule's state, pending ticks and jobs live under its queue's tag; ticks run."""
    schedules = tmp_path / "schedules.yaml"
    schedules.write_text("schedules:\n  - name: tick\n    task: add\n    queue: mail\n    every: 1s\n"
                         "    kwargs: {a: 1, b: 1}\n")
    start("mail", "taskiq", "--scheduler", WORKER_SCHEDULES_FILE=str(schedules))
    client = WorkerClient(_settings(cenv))
    try:
        async def fired() -> list[dict[str, str]]:
            return [e async for e in read_events_of(client.redis, client.keys, [], queue="mail",
                                                    type_="job.completed") if e["job_id"].startswith("sched:tick:")]

        async def two() -> bool:
            return len(await fired()) >= 2

        await until(two, 15, what="two scheduled ticks completed")
    finally:
        await client.close()
    listed = app(cenv, "schedules", WORKER_SCHEDULES_FILE=str(schedules))
    assert listed.returncode == 0 and "tick" in listed.stdout, listed.stderr


def _replica_of(cluster: Cluster, queue: str) -> Any:
    """The RedisServer replicating the master that serves ``queue``'s slot (CLUSTER SLOTS, raw)."""
    with redis.Redis(port=cluster.servers[0].port) as plain:
        slot = int(plain.execute_command("CLUSTER", "KEYSLOT", f"{{{queue}}}"))
        ranges = plain.execute_command("CLUSTER", "SLOTS")
    low, high, master, *replicas = next(r for r in ranges if int(r[0]) <= slot <= int(r[1]))
    assert len(replicas) == 1, ranges
    return next(server for server in cluster.servers if server.port == int(replicas[0][1]))


@pytest.mark.parametrize("engine", CLUSTER_ENGINES)
async def test_wait_replicas_goes_to_each_queues_master(
    engine: str, cenv: dict[str, str], start: Any, redis_cluster: Cluster,  # noqa: F811
) -> None:
    """REDIS_WAIT_REPLICAS on Cluster: the script and WAIT go to the master of the queue's slot.
    WAIT 1 confirms enqueues on all three masters; with the replica of one master stopped
    (SIGSTOP), WAIT 1 there says not confirmed while the other queues still confirm, so the WAIT
    went to that master; WAIT 2 (one replica per master) names the jobs. Every job runs."""
    for server in redis_cluster.servers:  # the first enqueues meet NOSCRIPT (as after a promotion)
        with redis.Redis(port=server.port) as node:
            node.script_flush()
    for queue in QUEUES:
        start(queue, engine)
    waiting = WorkerClient(_settings(cenv, worker_backend=engine, redis_wait_replicas=1, redis_wait_timeout_ms=2000))
    short = WorkerClient(_settings(cenv, worker_backend=engine, redis_wait_replicas=2, redis_wait_timeout_ms=100))
    try:
        jobs = [await waiting.enqueue("add", n, 1, _queue=queue) for n, queue in enumerate(QUEUES)]
        many = await waiting.enqueue_many([JobRequest("add", (n, 10), queue=queue) for n, queue in enumerate(QUEUES * 2)])
        with pytest.raises(NotReplicated) as two:
            await short.enqueue("add", 40, 1, _queue="images")
        assert "only 1 of 2 replicas" in str(two.value) and "\n" not in str(two.value), two.value
        with pytest.raises(NotReplicated) as two_many:
            await short.enqueue_many([JobRequest("add", (50, 1), queue="mail"), JobRequest("add", (60, 1), queue="mail")])
        assert len(two_many.value.job_ids) == 2

        replica = _replica_of(redis_cluster, "billing")
        stopped = WorkerClient(_settings(cenv, worker_backend=engine, redis_wait_replicas=1, redis_wait_timeout_ms=100))
        replica.process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(NotReplicated) as frozen:
                await stopped.enqueue("add", 70, 1, _queue="billing")
            assert "only 0 of 1" in str(frozen.value), frozen.value
            fine = await stopped.enqueue("add", 80, 1, _queue="mail")
        finally:
            replica.process.send_signal(signal.SIGCONT)
            await stopped.close()

        assert [await waiting.job(job.job_id).result(TIMEOUT) for job in jobs] == [1, 2, 3]
        assert [await waiting.job(job.job_id).result(TIMEOUT) for job in many if job] == [10, 11, 12, 13, 14, 15]
        late = [two.value.job_ids[0], *two_many.value.job_ids, frozen.value.job_ids[0], fine.job_id]
        assert [await waiting.job(job_id).result(TIMEOUT) for job_id in late] == [41, 51, 61, 71, 81]
    finally:
        await waiting.close()
        await short.close()


async def test_wait_follows_ask_and_moved(redis_cluster: Cluster) -> None:  # noqa: F811
    """The script + WAIT pair follows a slot on the move: ASK while it migrates (sent again with
    ASKING to the importing master), MOVED once it moved (the slot map patched); WAIT each time
    on the master that took the write. The empty slot is moved by hand and moved back."""
    from app.components.worker.runtime.batch import call_script
    from app.core.redis_cluster import AsyncCluster

    tag = f"{{w{uuid.uuid4().hex[:6]}}}"
    client = AsyncCluster(host="127.0.0.1", port=redis_cluster.servers[0].port)
    await client.initialize()
    script = client.register_script("return redis.call('SET', KEYS[1], ARGV[1])")
    slot = client.keyslot(f"{tag}:k")
    masters = {int(node.port): redis.Redis(port=int(node.port)) for node in client.get_primaries()}
    source = int(client.get_node_from_key(f"{tag}:k").port)
    target = next(port for port in masters if port != source)
    ids = {port: masters[port].execute_command("CLUSTER", "MYID") for port in (source, target)}

    def move(a: int, b: int, finish: bool) -> None:
        if not finish:
            masters[b].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[a])
            masters[a].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[b])
            return
        for port in (b, a):
            masters[port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[b])

    def asking(port: int, *command: Any) -> Any:  # a command on a master that imports the slot
        with masters[port].pipeline(transaction=False) as pipe:
            pipe.execute_command("ASKING")
            pipe.execute_command(*command)
            return pipe.execute()[1]

    try:
        move(source, target, finish=False)  # the key is not on the source: it answers ASK
        assert await call_script(script, [f"{tag}:k"], ["1"], then=("WAIT", 1, 2000)) == (b"OK", 1)
        assert asking(target, "GET", f"{tag}:k") == b"1"
        move(source, target, finish=True)  # the client's map still says source: MOVED
        assert await call_script(script, [f"{tag}:k"], ["2"], then=("WAIT", 1, 2000)) == (b"OK", 1)
        assert masters[target].get(f"{tag}:k") == b"2"
        assert int(client.get_node_from_key(f"{tag}:k").port) == target
    finally:
        asking(target, "DEL", f"{tag}:k")
        for port in (source, target):  # back as it was (also after a failure half way)
            masters[port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[source])
        for link in masters.values():
            link.close()
        await client.aclose()
