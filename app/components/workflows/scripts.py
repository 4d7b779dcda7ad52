"""Lua scripts of workflows, read once from ``components/workflows/lua``."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

LUA_DIR = Path(__file__).resolve().parent / "lua"


@cache
def source(name: str) -> str:
    return (LUA_DIR / f"{name}.lua").read_text()


def script(redis: Any, name: str) -> Any:
    """A registered script (EVALSHA, reloaded on NOSCRIPT after a Redis restart)."""
    return redis.register_script(source(name))
