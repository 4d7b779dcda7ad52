"""Processes: a task's own cancellation, graceful stops under every signal path, no orphans,
Redis socket deadlines, and a password-protected Redis reached without a password."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from app.components.worker.api import WorkerClient
from app.core.errors import JobFailed
from app.core.redis_server import RedisServer
from tests.conftest import ROOT, until, wait_until
from tests.faults import TcpProxy
from tests.test_contract import trail, wait_trail

ENGINES = ["arq", "dramatiq", "taskiq"]


# ---- 1. a task's own CancelledError is a failed attempt, not a shutdown --------------------------------

@pytest.mark.parametrize("engine", ENGINES)
async def test_task_that_cancels_itself_fails_after_max_tries(engine: str, client: WorkerClient,
                                                              start_worker: Any) -> None:
    start_worker("contract", engine)
    job = await client.enqueue("cancels_itself", _queue="contract")
    with pytest.raises(JobFailed) as failed:
        await job.result(30)
    assert failed.value.error_type == "TaskCancelled"
    assert (await job.info())["attempts"] == 3
    events = await wait_trail(client, job.job_id, "job.failed")
    assert [e["type"] for e in events] == ["job.enqueued", "job.started", "job.retried", "job.started",
                                           "job.retried", "job.started", "job.failed"]
    # No redelivery after the end: a later job runs, and the first one's trail has not grown.
    assert await (await client.enqueue("add", 1, 2)).result(30) == 3
    assert [e["type"] for e in await trail(client, job.job_id)] == [e["type"] for e in events]
    assert await job.status() == "failed"


# ---- 2. Ctrl-C, docker stop, kill -TERM: all graceful on a supervised worker ----------------------------

def spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """An `app` command in a session of its own, as a terminal would run it (its own process group)."""
    return subprocess.Popen([sys.executable, "-m", "app", *argv], env=env, cwd=ROOT, start_new_session=True)


async def _running_on_two_children(client: WorkerClient, engine: str, tmp_path: Path, ms: int) -> list[Any]:
    jobs = [await client.enqueue("chaos_job", str(tmp_path), f"j{i}", ms) for i in range(2)]

    async def both_running() -> bool:
        owners = set()
        for job in jobs:
            record = await client.redis.hgetall(client.keys.job(job.job_id))
            if record.get(b"status") != b"running":
                return False
            owners.add(record.get(b"owner"))
        return len(owners) == 2

    deadline = time.monotonic() + 30
    while not await both_running():
        assert time.monotonic() < deadline, "two jobs never ran on two processes at once"
        await asyncio.sleep(0.02)
    return jobs


async def _worker_events(client: WorkerClient, type_: str) -> list[dict[str, str]]:
    from app.components.worker.events import read_events

    return [e async for e in read_events(client.redis, client.keys, type_=type_)]


def _supervised(env: dict[str, str], engine: str, prefix: str, redis_url: str,
                stderr: Path | None = None) -> subprocess.Popen[bytes]:
    import redis

    argv = ["worker", "contract", "--backend", engine, "--processes", "2", "--threads", "1"]
    # one job per child: Dramatiq would otherwise prefetch both onto one process
    worker_env = {**env, "WORKER_SHUTDOWN_TIMEOUT": "20", "dramatiq_queue_prefetch": "1"}
    if stderr is None:
        proc = spawn(argv, worker_env)
    else:
        with stderr.open("wb") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "app", *argv], env=worker_env, cwd=ROOT,
                                    start_new_session=True, stderr=sink)
    with redis.Redis.from_url(redis_url) as r:
        def two_beats() -> bool:
            assert proc.poll() is None, f"supervisor exited with {proc.returncode}"
            return len(r.keys(f"{prefix}:heartbeat:contract:*")) >= 2
        wait_until(two_beats, 30, what="two heartbeats")
    return proc


@pytest.mark.parametrize(("engine", "how"), [("arq", "SIGINT to the group"), ("dramatiq", "SIGINT to the group"),
                                             ("taskiq", "SIGINT to the group"), ("arq", "SIGTERM to the supervisor")])
async def test_supervised_worker_stops_gracefully(engine: str, how: str, client: WorkerClient, env: dict[str, str],
                                                 prefix: str, redis_url: str, tmp_path: Path) -> None:
    proc = _supervised(env, engine, prefix, redis_url)
    try:
        jobs = await _running_on_two_children(client, engine, tmp_path, ms=1500)
        if how.startswith("SIGINT"):
            os.killpg(os.getpgid(proc.pid), signal.SIGINT)  # what a terminal does on Ctrl-C
        else:
            proc.send_signal(signal.SIGTERM)  # docker stop (PID 1), kill -TERM
        assert await asyncio.to_thread(proc.wait, 30) == 0
        for job in jobs:
            events = await wait_trail(client, job.job_id, "job.completed")
            assert [e["type"] for e in events] == ["job.enqueued", "job.started", "job.completed"]
        assert sorted(p.read_text().count("\n") for p in tmp_path.iterdir()) == [1, 1]  # each ran once
        stopped = [e for e in await _worker_events(client, "worker.stopped") if e["queue"] == "contract"]
        assert len(stopped) == 2
    finally:
        _hard_stop(proc)


def _hard_stop(proc: subprocess.Popen[bytes]) -> None:
    """Two SIGTERMs: the supervisor and its children exit at once (no strays after a failure)."""
    for _ in range(2):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("engine", ["arq"])
async def test_second_signal_is_the_hard_exit(engine: str, client: WorkerClient, env: dict[str, str], prefix: str,
                                             redis_url: str, tmp_path: Path) -> None:
    log = tmp_path / "supervisor.log"
    proc = _supervised({**env, "LOG_LEVEL": "INFO"}, engine, prefix, redis_url, stderr=log)
    try:
        await _running_on_two_children(client, engine, tmp_path, ms=20_000)
        proc.send_signal(signal.SIGTERM)
        # Two signals sent at once may merge into one (the kernel queues one pending SIGTERM):
        # the second must come after the first was handled, as a person's second Ctrl-C does.
        await asyncio.to_thread(wait_until, lambda: b"gracefully" in log.read_bytes(), 10, 0.02,
                                "the supervisor's first signal handled")
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert await asyncio.to_thread(proc.wait, 10) != 0
        assert time.monotonic() - started < 5  # not the 20 s job, not the 20 s grace
    finally:
        _hard_stop(proc)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _reloader(env: dict[str, str], engine: str, cwd: Path, stderr: Any = None,
              background: bool = False) -> subprocess.Popen[bytes]:
    """`app worker contract --reload` as a terminal runs it; ``background``: as a non-interactive
    shell's ``cmd &`` (CI) runs it, with SIGINT ignored, which Python then leaves ignored."""
    return subprocess.Popen([sys.executable, "-m", "app", "worker", "contract", "--backend", engine, "--reload"],
                            env={**env, "WORKER_SHUTDOWN_TIMEOUT": "20"}, cwd=cwd, start_new_session=True,
                            stderr=stderr, preexec_fn=_ignore_sigint if background else None)


async def _running(client: WorkerClient, tmp_path: Path, ms: int) -> Any:
    job = await client.enqueue("chaos_job", str(tmp_path), "j", ms)
    await until(lambda: _is_running(job), 30, "the job running")
    return job


async def _is_running(job: Any) -> bool:
    return await job.status() == "running"


@pytest.mark.parametrize("engine", ["arq"])
@pytest.mark.parametrize("background", [False, True], ids=["terminal", "sigint-ignored"])
async def test_ctrl_c_on_a_reloading_worker_is_graceful(engine: str, background: bool, client: WorkerClient,
                                                       env: dict[str, str], prefix: str, redis_url: str,
                                                       tmp_path: Path) -> None:
    """`--reload`: the reloader passes the terminal's SIGINT on once, also when it was started
    with SIGINT ignored (watchfiles' own reloader then never saw it: a CI-only 30 s hang)."""
    import redis

    proc = _reloader(env, engine, tmp_path, background=background)
    try:
        with redis.Redis.from_url(redis_url) as r:
            wait_until(lambda: r.keys(f"{prefix}:heartbeat:contract:*"), 30, what="the reloaded worker's heartbeat")
        job = await _running(client, tmp_path, 1500)
        os.killpg(os.getpgid(proc.pid), signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        events = await wait_trail(client, job.job_id, "job.completed")
        assert [e["type"] for e in events] == ["job.enqueued", "job.started", "job.completed"]
        assert len(await _worker_events(client, "worker.stopped")) == 1
    finally:
        _hard_stop(proc)


@pytest.mark.parametrize("engine", ["arq"])
async def test_ctrl_c_while_a_reload_stops_the_worker_is_graceful(engine: str, client: WorkerClient,
                                                                  env: dict[str, str], prefix: str, redis_url: str,
                                                                  tmp_path: Path) -> None:
    """Ctrl-C while a code change is stopping the worker (it drains a running job): the worker
    is not sent a second signal (its hard exit), no new worker starts, the job completes once."""
    import redis

    log = tmp_path / "reloader.log"
    with log.open("wb") as sink:
        proc = _reloader({**env, "LOG_LEVEL": "INFO"}, engine, tmp_path, stderr=sink)
    try:
        with redis.Redis.from_url(redis_url) as r:
            wait_until(lambda: r.keys(f"{prefix}:heartbeat:contract:*"), 30, what="the reloaded worker's heartbeat")
        job = await _running(client, tmp_path, 3000)
        (tmp_path / "changed.py").write_text("")  # a code change: the reloader stops the worker
        await asyncio.to_thread(wait_until, lambda: b"finishing running jobs" in log.read_bytes(), 30, 0.01,
                                "the worker stopping for the reload")
        os.killpg(os.getpgid(proc.pid), signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 30) == 0, log.read_text()
        events = await wait_trail(client, job.job_id, "job.completed")
        assert [e["type"] for e in events] == ["job.enqueued", "job.started", "job.completed"]
        assert len(await _worker_events(client, "worker.started")) == 1, log.read_text()
        assert len(await _worker_events(client, "worker.stopped")) == 1
        assert b"exiting now" not in log.read_bytes()
    finally:
        _hard_stop(proc)


# ---- 3. nothing outlives `app dev` or the supervisor -------------------------------------------------

def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, start time) from /proc (psutil is not a dependency)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        table[int(entry)] = (int(fields[1]), fields[0], fields[19])
    return table


def _descendants(root: int) -> dict[int, str]:
    """Live descendants of ``root`` as pid -> start time (a reused pid is not the same process)."""
    table = _proc_table()
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _state, start) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def _still_running(procs: dict[int, str]) -> list[int]:
    table = _proc_table()
    return [pid for pid, start in procs.items() if pid in table and table[pid][2] == start and table[pid][1] != "Z"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=lambda s: s.name)
def test_app_dev_leaves_nothing_behind(sig: int, env: dict[str, str], tmp_path: Path) -> None:
    from app.core.redis_server import free_port

    out = tmp_path / "dev.out"
    dev_env = {**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}",  # nothing there: a private Redis
               "WORKER_QUEUE_PACKAGES": "app.components.worker.queues", "WORKER_SHUTDOWN_TIMEOUT": "5",
               "TMPDIR": str(tmp_path)}  # a SIGKILLed `app dev` cannot remove its Redis directory
    with out.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "app", "dev"], env=dev_env, cwd=tmp_path,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: b"following events" in out.read_bytes() or proc.poll() is not None, 60,
                   what="app dev following events")
        assert proc.poll() is None, out.read_text()
        children = _descendants(proc.pid)
        commands = " ".join(Path(f"/proc/{pid}/cmdline").read_text() for pid in children)
        assert "redis-server" in commands and commands.count("worker") >= 2, commands
        os.kill(proc.pid, sig)
        try:
            wait_until(lambda: not _still_running(children), 30, 0.1, what=f"children of app dev gone after {sig!r}")
        except AssertionError as exc:
            left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _still_running(children)}
            raise AssertionError(f"{exc}: still running {left}; app dev said:\n{out.read_text()}") from None
        assert proc.wait(10) == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
        assert "Traceback" not in out.read_text() and "Exception ignored" not in out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("engine", ["arq"])
def test_supervisor_sigkilled_leaves_no_workers(engine: str, env: dict[str, str], prefix: str,
                                                redis_url: str) -> None:
    proc = _supervised(env, engine, prefix, redis_url)
    children = _descendants(proc.pid)
    assert len(children) == 2
    proc.kill()
    proc.wait()
    wait_until(lambda: not _still_running(children), 30, 0.1, what="workers gone after their supervisor")


# ---- 4. socket deadlines: a half-open connection fails a call, it does not stall it --------------------

def test_heartbeat_fails_fast_on_a_blackholed_connection_and_beats_again(make_settings: Any, redis_url: str,
                                                                          prefix: str) -> None:
    import redis

    from app.components.worker.health import Heartbeat
    from app.components.worker.keys import Keys
    from app.core.redis import heartbeat_client

    with TcpProxy(redis_url) as proxy, redis.Redis.from_url(redis_url) as direct:
        settings = make_settings(redis_url=proxy.url, worker_offline_after=6, worker_heartbeat_interval=0.2)
        deadline = min(5.0, 6 / 3)  # the heartbeat client's socket timeout
        beat = Heartbeat(heartbeat_client(settings), Keys(prefix), settings, queue="contract", engine="arq",
                         worker_id="half-open", instance="half-open~1", labels={}, concurrency=1,
                         counters=lambda: {"running": 0, "done": 0, "failed": 0})
        key = Keys(prefix).heartbeat("contract", "half-open")
        beat.beat()
        proxy.cut("blackhole")  # the open connection now swallows every byte, new ones are accepted silently
        started = time.monotonic()
        with pytest.raises(redis.RedisError):
            beat.beat()
        took = time.monotonic() - started
        assert deadline * 0.8 < took < deadline * 2 + 1, took  # about one socket timeout, not the kernel's

        failed = threading.Event()
        handler = logging.Handler()
        handler.emit = lambda record: failed.set() if "heartbeat failed" in record.getMessage() else None  # type: ignore[method-assign]
        logging.getLogger("app.components.worker.health").addHandler(handler)
        try:
            beat.start()  # the thread keeps trying while the proxy blackholes
            assert failed.wait(deadline * 2 + 2), "the heartbeat thread never reported a failed beat"
        finally:
            logging.getLogger("app.components.worker.health").removeHandler(handler)
        last = direct.get(key)
        proxy.restore()
        restored = time.monotonic()
        wait_until(lambda: direct.get(key) != last, 6, 0.05, what="a heartbeat after the proxy forwards again")
        assert time.monotonic() - restored < 6  # within the offline threshold
        asyncio.run(beat.stop())


def test_cli_against_a_blackholed_redis_is_one_line_after_the_socket_timeout(env: dict[str, str], redis_url: str,
                                                                            tmp_path: Path) -> None:
    with TcpProxy(redis_url) as proxy:
        proxy.cut("blackhole")  # connections are accepted, nothing ever answers
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "app", "queues"], env={**env, "REDIS_URL": proxy.url,
                              "REDIS_SOCKET_TIMEOUT": "1.5"}, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        took = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"error: Redis at redis://127.0.0.1:{proxy.port} did not answer within 1.5s "
                                        "(REDIS_SOCKET_TIMEOUT): check the network to it and whether it is "
                                        "overloaded or paused"], proc.stderr
    assert took < 1.5 * 2 + 3, took  # one deadline (a timeout is not retried), plus Python's start


async def test_a_cancelled_redis_call_is_never_swallowed(make_settings: Any) -> None:
    """With socket_timeout set, redis-py writes through asyncio.wait_for, which on Python 3.11
    drops a cancellation that lands as the write completes (app.core.redis_cancel avoids wait_for)."""
    from app.core.redis import async_client

    client = async_client(make_settings())
    swallowed = 0

    async def busy() -> None:
        while True:
            await client.set("cancel-probe", 1)

    try:
        for i in range(300):
            task = asyncio.create_task(busy())
            for _ in range(i % 9):
                await asyncio.sleep(0)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=2)
            if not done:
                swallowed += 1
                task.cancel()
                await asyncio.wait({task}, timeout=2)
        assert swallowed == 0, f"{swallowed} of 300 cancellations were swallowed"
    finally:
        await client.aclose()


# ---- 5. a Redis that requires a password, reached without one: one line, exit 2, at once ---------------

@pytest.fixture(scope="module")
def password_server() -> Any:
    server = RedisServer(password="s3cret-pass").start()
    yield server
    server.cleanup()


@pytest.mark.parametrize("argv", [["queues"], ["enqueue", "add", "--queue", "contract", "--", "a=1", "b=2"],
                                  ["health", "contract"], ["worker", "contract"], ["dev", "--once"]],
                         ids=lambda argv: " ".join(argv[:2]))
def test_password_required_but_missing_is_one_line(argv: list[str], env: dict[str, str],
                                                   password_server: RedisServer, tmp_path: Path) -> None:
    env = {**env, "REDIS_URL": f"redis://127.0.0.1:{password_server.port}"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "app", *argv], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=30)
    took = time.monotonic() - started
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: Redis at redis://127.0.0.1:{password_server.port} requires a password: "
                     "set REDIS_PASSWORD (or put it in REDIS_URL)"], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert took < 10, took
