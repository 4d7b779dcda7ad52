"""One module per queue, each holding a ``WorkerSettings`` class (arq's style)."""
