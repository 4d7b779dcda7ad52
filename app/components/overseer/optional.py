"""Features built beside the dashboard (dead letters, pause/resume), used when present.

The dashboard keeps their places in its pages and API either way; an action whose module is
not installed answers 501 with a sentence saying so, instead of failing to import.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def module(name: str) -> ModuleType | None:
    """``app.components.worker.routing.<name>``, or None when this build has no such module."""
    try:
        return importlib.import_module(f"app.components.worker.routing.{name}")
    except ImportError:
        return None


def dead() -> ModuleType | None:
    return module("dead")


def pause() -> ModuleType | None:
    return module("pause")
