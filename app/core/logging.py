"""Logging setup: one scannable line per record, engines' chatty per-job loggers quietened."""

from __future__ import annotations

import logging
import os

QUIET_LOGGERS = ("arq", "dramatiq", "taskiq", "taskiq_redis", "watchfiles")


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
