"""Containers as operators run them, checked without a Docker engine.

- `.env.example` and the settings match both ways, and its values are the defaults.
- `docker-compose.yml` passes `docker-compose config -q`, and a broken copy does not.
- Each worker service's command, run with the service's environment against the test Redis,
  passes the service's health check, does a job on the engine compose chose, stops with exit 0
  on SIGTERM, and then fails the health check.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.components.worker.registry import Registry
from app.core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

# `.env.example`: the section from this heading on is read by docker-compose only.
COMPOSE_ONLY_HEADING = "Read by docker-compose only"
ENV_LINE = re.compile(r"^\s*(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
COMPOSE_VARIABLE = re.compile(r"\$\{([A-Z][A-Z0-9_]*)")
# In .env.example on purpose: the container URL and the host URL, not the default URL.
REDIS_URL_PAIR = {"REDIS_URL": "redis://redis:6379", "REDIS_URL_LOCAL": "redis://localhost:6379"}

SHIPPED_QUEUES = sorted(Registry.discover(["app.components.worker.queues"]).queues)
SETTING_NAMES = {name.upper() for name in Settings.model_fields}

# One job per queue, as in the brief: the task and the `app enqueue` arguments that reach it.
SMOKE_JOBS = {
    "system": ["system_health_check"],
    "load_test": ["noop", "--queue", "load_test"],
}
WORKER_START_TIMEOUT = 30.0


# ---------------------------------------------------------------------------------------------
# .env.example


def parse_env_example() -> tuple[dict[str, str], dict[str, str], set[str]]:
    """(application variables, compose-only variables) as name -> value, and the names whose
    line is commented out."""
    app_vars: dict[str, str] = {}
    compose_vars: dict[str, str] = {}
    commented: set[str] = set()
    target = app_vars
    for line in ENV_EXAMPLE.read_text().splitlines():
        if COMPOSE_ONLY_HEADING in line:
            target = compose_vars
            continue
        match = ENV_LINE.match(line)
        if match:
            name, value = match.group(2), match.group(3).strip()
            assert name not in app_vars and name not in compose_vars, f"{name} is listed twice in .env.example"
            target[name] = value
            if match.group(1):
                commented.add(name)
    return app_vars, compose_vars, commented


def is_queue_backend_variable(name: str) -> bool:
    return name.startswith("WORKER_BACKEND_") and name[len("WORKER_BACKEND_"):].lower() in SHIPPED_QUEUES


def test_env_example_matches_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    app_vars, compose_vars, commented = parse_env_example()
    assert compose_vars, f"no {COMPOSE_ONLY_HEADING!r} section in .env.example"

    # Every setting is documented.
    missing = SETTING_NAMES - set(app_vars)
    assert not missing, f"settings missing from .env.example: {sorted(missing)}"

    # Everything documented is a setting, or WORKER_BACKEND_<QUEUE> of a shipped queue.
    unknown = {n for n in app_vars if n not in SETTING_NAMES and not is_queue_backend_variable(n)}
    assert not unknown, f".env.example lists variables no setting reads: {sorted(unknown)}"
    assert {f"WORKER_BACKEND_{q.upper()}" for q in SHIPPED_QUEUES} <= set(app_vars)

    # The compose-only section is exactly what docker-compose.yml interpolates (bar settings and
    # WORKER_BACKEND_<QUEUE>, which are documented above it), and holds no setting.
    interpolated = set(COMPOSE_VARIABLE.findall(COMPOSE_FILE.read_text()))
    assert not set(compose_vars) & SETTING_NAMES, "a setting is listed as compose-only"
    assert set(compose_vars) - interpolated == set(), (
        f"compose-only variables docker-compose.yml never reads: {sorted(set(compose_vars) - interpolated)}")
    undocumented = interpolated - set(compose_vars) - set(app_vars)
    assert not undocumented, f"docker-compose.yml reads variables .env.example omits: {sorted(undocumented)}"

    # The values are the defaults (bar the container/host URL pair) and all of them validate.
    for name in list(os.environ):
        if name.upper() in SETTING_NAMES or name.upper().startswith("WORKER_BACKEND_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env
    uncommented = tmp_path / "example.env"
    # Each line as written; a commented one that shows a value, uncommented.
    uncommented.write_text("".join(f"{n}={v}\n" for n, v in app_vars.items() if v or n not in commented))
    loaded = Settings(_env_file=uncommented)  # type: ignore[call-arg]
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    for field in Settings.model_fields:
        if field.upper() in REDIS_URL_PAIR:
            assert app_vars[field.upper()] == REDIS_URL_PAIR[field.upper()]
            continue
        assert getattr(loaded, field) == getattr(defaults, field), (
            f"{field.upper()}={app_vars[field.upper()]!r} in .env.example is not the default "
            f"{getattr(defaults, field)!r}")
    # Host CLI commands use REDIS_URL_LOCAL; containers (DOCKER_CONTAINER=1) use REDIS_URL.
    assert loaded.effective_redis_url == REDIS_URL_PAIR["REDIS_URL_LOCAL"]
    in_container = Settings(_env_file=uncommented, docker_container=True)  # type: ignore[call-arg]
    assert in_container.effective_redis_url == REDIS_URL_PAIR["REDIS_URL"]


# ---------------------------------------------------------------------------------------------
# Dockerfile (static: there is no Docker engine to build it)


def test_dockerfile_is_multi_stage_unprivileged_and_copies_what_exists() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    stages = [ln for ln in lines if ln.upper().startswith("FROM ")]
    assert len(stages) >= 2 and all(ln.split()[1] == "python:3.11-slim" for ln in stages), stages
    final = lines[lines.index(stages[-1]):]
    users = [ln.split()[1] for ln in final if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the runtime stage must not run as root"
    assert 'ENTRYPOINT ["app"]' in final
    assert 'CMD ["worker", "system"]' in final
    # Every COPY from the build context copies something that is in the repository.
    for ln in lines:
        parts = ln.split()
        if parts[0].upper() == "COPY" and not any(p.startswith("--from") for p in parts):
            sources = [s for s in parts[1:-1] if not s.startswith("--")]
            assert any(list(ROOT.glob(s)) for s in sources), f"{ln}: none of its sources exists"
            for source in sources:
                assert "*" in source or "[" in source or (ROOT / source).exists(), f"{ln}: no {source}"


# ---------------------------------------------------------------------------------------------
# docker-compose.yml


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if not found:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    return found


def compose_env(**extra: str) -> dict[str, str]:
    """The caller's environment without anything compose would interpolate or hand to a worker."""
    app_vars, compose_vars, _ = parse_env_example()
    drop = SETTING_NAMES | set(app_vars) | set(compose_vars)
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in drop and not k.upper().startswith(("WORKER_", "REDIS_", "COMPOSE_"))}
    env.update(extra)
    return env


def compose_project(tmp_path: Path, text: str | None = None) -> Path:
    """docker-compose.yml (or ``text``) and .env.example in a directory of their own (no .env)."""
    directory = tmp_path / "project"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "docker-compose.yml").write_text(text if text is not None else COMPOSE_FILE.read_text())
    shutil.copy(ENV_EXAMPLE, directory / ".env.example")
    return directory


def run_compose(directory: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([docker_compose(), "-f", str(directory / "docker-compose.yml"), *args],
                          cwd=directory, env=env or compose_env(), capture_output=True, text=True, timeout=60)


def parse_yaml(text: str) -> Any:
    """PyYAML when installed; otherwise the interpreter docker-compose (v1, Python) runs on."""
    try:
        import yaml  # type: ignore[import-untyped]

        return yaml.safe_load(text)
    except ImportError:
        pass
    with open(docker_compose(), "rb") as script:
        first = script.readline().decode(errors="replace")
    if first.startswith("#!") and "python" in first:
        interpreter = first[2:].strip().split()
        converted = subprocess.run(
            [*interpreter, "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
            input=text, capture_output=True, text=True, timeout=30,
        )
        if converted.returncode == 0:
            return json.loads(converted.stdout)
    return None


def resolved_compose(tmp_path: Path, **extra_env: str) -> dict[str, Any]:
    """`docker-compose config`: the file with every variable and env_file resolved."""
    directory = compose_project(tmp_path)
    env = compose_env(**extra_env)
    done = run_compose(directory, "config", env=env)
    assert done.returncode == 0, done.stderr
    config = parse_yaml(done.stdout)
    if config is None:  # Compose v2 (Go) prints JSON itself
        done = run_compose(directory, "config", "--format", "json", env=env)
        assert done.returncode == 0, f"cannot read the resolved compose file: {done.stderr}"
        config = json.loads(done.stdout)
    return config


def test_compose_file_is_valid(tmp_path: Path) -> None:
    directory = compose_project(tmp_path)
    for profile in ([], ["--profile", "dev"]):
        done = run_compose(directory, *profile, "config", "-q")
        assert done.returncode == 0, f"docker-compose {' '.join(profile)} config -q: {done.stderr}"

    # A service key compose does not know is refused, by name.
    text = COMPOSE_FILE.read_text()
    assert "\n  worker-system:\n" in text
    broken = compose_project(tmp_path / "broken", text.replace(
        "\n  worker-system:\n", "\n  worker-system:\n    restart_polcy: always\n", 1))
    done = run_compose(broken, "config", "-q")
    assert done.returncode != 0
    assert "restart_polcy" in done.stderr + done.stdout


def default_workers(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in config["services"].items()
            if name.startswith("worker-") and not svc.get("profiles")}


def test_compose_has_one_worker_service_per_shipped_queue(tmp_path: Path) -> None:
    config = resolved_compose(tmp_path)
    workers = default_workers(config)
    served = sorted(svc["environment"]["WORKER_QUEUE_TYPE"] for svc in workers.values())
    assert served == SHIPPED_QUEUES
    redis = config["services"]["redis"]
    command = " ".join(redis["command"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction", "--save"):
        assert flag in command, f"redis is started without {flag}"
    host_ips = [p.get("host_ip") if isinstance(p, dict) else str(p).split(":")[0] for p in redis["ports"]]
    assert host_ips == ["127.0.0.1"], redis["ports"]
    for name, svc in workers.items():
        queue = svc["environment"]["WORKER_QUEUE_TYPE"]
        assert svc["command"] == ["worker", queue], name
        assert svc["healthcheck"]["test"] == ["CMD", "app", "health", queue], name
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert svc["restart"] == "unless-stopped", name
        grace = float(str(svc["stop_grace_period"]).rstrip("s"))
        assert grace > float(svc["environment"]["WORKER_SHUTDOWN_TIMEOUT"]), name
        dev = config["services"][f"{name}-dev"]
        assert dev["profiles"] == ["dev"] and dev["command"] == ["worker", queue, "--reload"]
        assert dev["environment"]["WATCHFILES_FORCE_POLLING"] == "1"
        assert dev["environment"]["PYTHONPATH"] == "/app"  # the mounted /app/app wins


def test_compose_redis_command_gives_a_durable_queue(tmp_path: Path) -> None:
    """The compose Redis command, run by a local redis-server: the settings take effect."""
    import redis

    from app.core.redis_server import find_redis_server, free_port

    command = resolved_compose(tmp_path)["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    port = free_port()
    data = tmp_path / "data"
    data.mkdir()
    server = subprocess.Popen([find_redis_server(), *command[1:], "--port", str(port), "--bind", "127.0.0.1",
                               "--dir", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port, decode_responses=True)
    try:
        def answers() -> bool:
            assert server.poll() is None, f"redis-server refused the compose command (exit {server.returncode})"
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        poll(answers, 10, "redis-server to answer", interval=0.02)
        config = {k: v for item in ("appendonly", "appendfsync", "maxmemory-policy", "maxmemory", "save")
                  for k, v in client.config_get(item).items()}
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "everysec"
        assert config["maxmemory-policy"] == "noeviction"
        assert int(config["maxmemory"]) > 0
        rules = [command[i + 1:i + 3] for i, arg in enumerate(command) if arg == "--save"]
        assert rules and config["save"] == " ".join(" ".join(rule) for rule in rules)
    finally:
        client.close()
        server.terminate()
        server.wait(10)


# ---------------------------------------------------------------------------------------------
# Each worker service's command and environment, against the test Redis


def app_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "app", *args]


def poll(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@pytest.mark.parametrize(
    ("service", "compose_vars"),
    [
        pytest.param("worker-system", {}, id="worker-system"),
        pytest.param("worker-load-test", {}, id="worker-load-test"),
        # The engine is chosen per queue from the environment compose interpolates.
        pytest.param("worker-load-test", {"WORKER_BACKEND_LOAD_TEST": "taskiq"}, id="worker-load-test-taskiq"),
    ],
)
def test_compose_worker_services_run(service: str, compose_vars: dict[str, str], redis_url: str,
                                     tmp_path: Path) -> None:
    config = resolved_compose(tmp_path, **compose_vars)
    svc = default_workers(config)[service]
    environment = {k: "" if v is None else str(v) for k, v in svc["environment"].items()}
    queue = environment["WORKER_QUEUE_TYPE"]
    engine = environment[f"WORKER_BACKEND_{queue.upper()}"]
    assert environment["DOCKER_CONTAINER"] == "1"
    for name, value in compose_vars.items():
        assert environment[name] == value

    # The container's environment, on the test Redis and a key prefix of this test only.
    prefix = f"deploy{uuid.uuid4().hex[:10]}"
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in SETTING_NAMES and not k.upper().startswith(("WORKER_", "REDIS_"))}
    env.update(environment)
    env.update({"REDIS_URL": redis_url, "WORKER_KEY_PREFIX": prefix, "PYTHONPATH": str(ROOT)})
    workdir = tmp_path / "workdir"  # no .env here: only the service's environment counts
    workdir.mkdir()

    def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, env=env, cwd=workdir, capture_output=True, text=True, timeout=timeout)

    health = svc["healthcheck"]["test"]
    assert health[:2] == ["CMD", "app"], health
    healthcheck = app_command(*health[2:])
    assert cli(*healthcheck).returncode != 0, "healthy before the worker started"

    log = (tmp_path / "worker.log").open("w+")
    worker = subprocess.Popen(app_command(*svc["command"]), env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)

    def worker_log() -> str:
        log.flush()
        log.seek(0)
        return log.read()

    try:
        def healthy() -> bool:
            assert worker.poll() is None, f"worker exited with {worker.returncode}:\n{worker_log()}"
            return cli(*healthcheck).returncode == 0

        poll(healthy, WORKER_START_TIMEOUT, f"`{' '.join(health[1:])}` to pass")

        # Every process compose asks for beats, on the engine compose chose.
        processes = int(environment["WORKER_PROCESSES"])

        def all_beating() -> list[dict[str, Any]] | None:
            done = cli(*app_command("workers", "--queue", queue, "--json"))
            assert done.returncode == 0, done.stderr
            rows = [r for r in json.loads(done.stdout) if r["state"] == "healthy"]
            return rows if len(rows) == processes else None

        rows = poll(all_beating, WORKER_START_TIMEOUT, f"{processes} healthy {queue} workers")
        assert {r["engine"] for r in rows} == {engine}, worker_log()

        # One job, done.
        job_id = f"{prefix}-smoke"
        done = cli(*app_command("enqueue", *SMOKE_JOBS[queue], "--job-id", job_id, "--wait", "--timeout", "30"))
        assert done.returncode == 0, f"enqueue exited {done.returncode}: {done.stderr}\n{worker_log()}"

        def completed() -> list[dict[str, Any]]:
            out = cli(*app_command("events", "--job", job_id, "--type", "job.completed", "--json")).stdout
            return [json.loads(line) for line in out.splitlines() if line.strip()]

        events = poll(completed, 10, f"job.completed of {job_id}")
        assert events[0]["queue"] == queue and events[0]["backend"] == engine, events

        # SIGTERM (what `docker stop` sends): a clean exit well within the grace period.
        worker.send_signal(signal.SIGTERM)
        grace = float(environment["WORKER_SHUTDOWN_TIMEOUT"]) + 5
        assert worker.wait(grace) == 0, worker_log()
        after = cli(*healthcheck)
        assert after.returncode != 0, f"healthy after the worker stopped: {after.stdout}"
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        log.close()
