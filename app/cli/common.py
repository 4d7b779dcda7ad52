"""What every command shares: settings, one-line errors, JSON output, a client."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import typer
from redis.exceptions import RedisError

from app.core.errors import AppError, PayloadError
from app.core.redis import explain
from app.core.settings import Settings, get_settings

T = TypeVar("T")


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def settings() -> Settings:
    return get_settings()


def run(coro_factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run an async command body, turning every expected error into one line and an exit code."""
    try:
        return asyncio.run(coro_factory())
    except AppError as exc:
        fail(str(exc), exc.exit_code)
    except RedisError as exc:
        err = explain(exc, get_settings())
        fail(str(err), err.exit_code)


def guarded(func: Callable[..., T]) -> Callable[..., T]:
    """Decorator for sync command bodies with the same error handling."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return func(*args, **kwargs)
        except AppError as exc:
            fail(str(exc), exc.exit_code)
        except RedisError as exc:
            err = explain(exc, get_settings())
            fail(str(err), err.exit_code)

    return wrapper


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, default=str) + "\n")
    sys.stdout.flush()


def parse_json(text: str, what: str) -> Any:
    """JSON from the command line; nesting too deep for the decoder is one line, not a
    RecursionError traceback."""
    try:
        return json.loads(text)
    except RecursionError:
        raise PayloadError(f"{what} is nested too deep to decode: flatten it or pass a reference") from None
    except ValueError as exc:
        raise AppError(f"{what} is not valid JSON ({exc.msg} at position {exc.pos}): "
                       "pass an object like '{\"n\": 1}'") from None


def parse_pairs(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` items; each value is JSON when it parses (10, true, [1,2]), else a string."""
    out: dict[str, Any] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AppError(f"argument {_short(item)} is not key=value: write e.g. iterations=1000")
        try:
            out[key] = json.loads(value)
        except RecursionError:
            raise PayloadError(f"argument {key!r} is nested too deep to decode: flatten it or pass a reference") from None
        except ValueError:
            out[key] = value
    return out


def _short(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
