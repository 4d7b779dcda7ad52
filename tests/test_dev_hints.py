"""`app dev`'s "enqueue more" hints name what another terminal needs, and only when it helps."""

from __future__ import annotations

import os
import subprocess
import sys

from app.cli.dev import _hint_prefix
from app.core.settings import load_settings
from tests.conftest import ROOT


def test_hint_names_the_url_from_the_environment_and_the_engine(monkeypatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:secret@10.0.0.5:6380/0")
    cfg = load_settings(_env_file=None)
    hint = _hint_prefix(cfg, private=False, backend="dramatiq")
    assert hint == "REDIS_URL=redis://10.0.0.5:6380/0 WORKER_BACKEND=dramatiq "
    assert "secret" not in hint


def test_hint_is_empty_when_settings_come_from_a_dotenv_file(monkeypatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_URL_LOCAL", raising=False)
    cfg = load_settings(_env_file=None)
    assert _hint_prefix(cfg, private=False, backend=None) == ""


def test_dev_once_does_not_suggest_enqueueing_into_what_it_stops(env: dict[str, str]) -> None:
    out = subprocess.run([sys.executable, "-m", "app", "dev", "--once"], env={**env, **{"PYTHONPATH": str(ROOT)}},
                         cwd=os.fspath(ROOT), capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--once: the workers stop now" in out.stdout
    assert "enqueue more" not in out.stdout
