"""Routing: when a job may start, and where (priorities, ``max_concurrency`` leases, worker
groups and label selectors with fallback, pause, rate limits), and dead letters.

A job that needs routing waits in the layer's own ordered sets per (queue, group) instead of
an engine's queue; a worker's admitter takes it from there, in one Lua call that checks the
limits and claims it, and runs it in that worker process. A queue that uses none of this keeps
the engines' path unchanged. See ``admit.py`` for the why.
"""
