"""The shared job wrapper and what it stands on: it runs inside every engine's worker."""
