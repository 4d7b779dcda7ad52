"""Engine adapters: one small module per engine, all behind ``EngineAdapter``."""

from __future__ import annotations

import importlib

from app.components.worker.engines.base import EngineAdapter

_MODULES = {"arq": "arq_engine", "dramatiq": "dramatiq_engine", "taskiq": "taskiq_engine"}


def engine_class(name: str) -> type[EngineAdapter]:
    """Import an engine only when a queue uses it."""
    module = importlib.import_module(f"app.components.worker.engines.{_MODULES[name]}")
    return module.Adapter  # type: ignore[no-any-return]
