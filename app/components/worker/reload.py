"""`app worker --reload`: restart the worker when Python files change (development only).

Uses watchfiles; set ``WATCHFILES_FORCE_POLLING=1`` on bind mounts where inotify is blind.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import watchfiles

from app.core.lifeline import mark_children


def run_with_reload() -> None:
    argv = [a for a in sys.argv[1:] if a != "--reload"]
    command = shlex.join([sys.executable, "-m", "app", *argv])
    package = Path(__file__).resolve().parents[2]  # the app package
    here = Path.cwd().resolve()  # where a project's own queue packages usually live
    paths = [here] if package.is_relative_to(here) else [package, here]
    # The worker leaves the terminal's process group, so Ctrl-C reaches this reloader only,
    # whose one SIGINT is the worker's graceful stop (two would be its hard exit).
    mark_children(own_session=True)
    watchfiles.run_process(*paths, target=command, target_type="command",
                           watch_filter=watchfiles.PythonFilter(), sigint_timeout=30)
