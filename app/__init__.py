"""app: a Redis-backed worker layer with a choice of engine (arq, Dramatiq, TaskIQ) per queue."""

__version__ = "0.1.0"
