"""The README's "Extending" example runs as written, on every engine."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT


def readme_block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return next(b for b in blocks if marker in b)


@pytest.mark.parametrize("engine", ["arq", "dramatiq", "taskiq"])
def test_extending_example(engine: str, env: dict[str, str], start_worker: Any, tmp_path: Path) -> None:
    package = tmp_path / "readme_example"
    (package / "queues").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "queues" / "__init__.py").write_text("")
    reports = readme_block("queues/reports.py")
    assert "/tmp/app-reports.db" in reports
    # The example's database goes to this test's directory, not the shared /tmp.
    (package / "queues" / "reports.py").write_text(reports.replace("/tmp/app-reports.db", str(tmp_path / "reports.db")))
    (package / "timing.py").write_text(readme_block("timing.py"))
    env.update({
        "PYTHONPATH": f"{tmp_path}:{ROOT}",
        "WORKER_QUEUE_PACKAGES": "readme_example.queues",
        "WORKER_MIDDLEWARE": "readme_example.timing:TimingMiddleware",
    })
    start_worker("reports", engine)
    proc = subprocess.run([sys.executable, "-m", "app", "enqueue", "record_run", "--wait", "--timeout", "30"],
                          env={**env, "WORKER_BACKEND": engine}, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"
