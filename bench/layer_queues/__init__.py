"""A queue for the bench only (``WORKER_QUEUE_PACKAGES=...,bench.layer_queues``): the layer
runs ``stamp`` like any task, so pickup latency is read from a timestamp the task takes."""
