"""A bad dependency resolution must fail CI, not a user: every engine imports and constructs."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("engine", ["arq", "dramatiq", "taskiq"])
def test_every_engine_imports(engine: str, make_settings: object) -> None:
    from app.components.worker.config import QueueConfig
    from app.components.worker.engines import engine_class
    from app.components.worker.keys import Keys

    cls = engine_class(engine)
    cfg = QueueConfig("contract", engine, 1, 2, 10.0, 3, 60, 0.1, 1.0)
    adapter = cls(make_settings(), Keys("imports"), cfg)  # type: ignore[arg-type]
    assert adapter.name == engine


def test_taskiq_compat_layer_is_there() -> None:
    # taskiq 0.13 removed taskiq.compat.model_dump, which taskiq-redis 1.0.x imports.
    importlib.import_module("taskiq_redis")
