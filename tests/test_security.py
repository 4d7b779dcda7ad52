"""Redis AUTH and TLS (rediss://) on every engine; a wrong password is one clear line."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from app.core.errors import AppError
from app.core.redis_server import RedisServer
from tests.conftest import ROOT

ENGINES = ["arq", "dramatiq", "taskiq"]


def enqueue_wait(env: dict[str, str], engine: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", "enqueue", "add", "--wait", "--timeout", "30", "--", "a=2", "b=3"],
                          env={**env, "WORKER_BACKEND": engine}, cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def password_server() -> Any:
    server = RedisServer(password="s3cret-pass").start()
    yield server
    server.cleanup()


@pytest.mark.parametrize("engine", ENGINES)
def test_password_from_redis_password(engine: str, env: dict[str, str], start_worker: Any,
                                      password_server: RedisServer) -> None:
    env.update({"REDIS_URL": f"redis://127.0.0.1:{password_server.port}", "REDIS_PASSWORD": "s3cret-pass"})
    start_worker("contract", engine)
    proc = enqueue_wait(env, engine)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "5"


def test_worker_with_wrong_password_is_one_line(env: dict[str, str], password_server: RedisServer) -> None:
    env.update({"REDIS_URL": f"redis://127.0.0.1:{password_server.port}", "REDIS_PASSWORD": "wrong"})
    proc = subprocess.run([sys.executable, "-m", "app", "worker", "contract"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "INFO" not in line]
    assert lines == [lines[0]] and "refused the credentials" in lines[0], proc.stderr


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    certs = tmp_path_factory.mktemp("tls")
    ca, ca_key, cert, key = (str(certs / n) for n in ("ca.crt", "ca.key", "server.crt", "server.key"))
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    try:
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1",
            "-subj", "/CN=test-ca")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", str(certs / "server.csr"),
            "-subj", "/CN=127.0.0.1")
        (certs / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
        run("x509", "-req", "-in", str(certs / "server.csr"), "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
            "-out", cert, "-days", "1", "-extfile", str(certs / "ext.cnf"))
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl cannot make test certificates here: {exc}")
    server = RedisServer(tls=(cert, key, ca), password="tls-pass")
    try:
        server.start()
    except AppError as exc:
        pytest.skip(f"this redis-server has no TLS support: {exc}")
    yield server
    server.cleanup()


@pytest.mark.parametrize("engine", ENGINES)
def test_tls(engine: str, env: dict[str, str], start_worker: Any, tls_server: RedisServer) -> None:
    env["REDIS_URL"] = tls_server.url
    start_worker("contract", engine)
    proc = enqueue_wait(env, engine)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "5"
