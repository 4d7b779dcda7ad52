"""Queues used only by the test suite (WORKER_QUEUE_PACKAGES=tests.queues)."""
