"""Workflows whose steps are jobs of any queue (hence any engine): Dagu's patterns on our queues.

Define a ``Workflow`` of ``Step``s in Python or load one from YAML (``load_file``); start it
with ``Workflows(client).start(wf)``. A run's state lives in Redis and advances through the
reconcilers that every worker process runs (``Reconciler``), so no process holds a run.
"""

from app.components.workflows.definition import ContinueOn, Precondition, RunNotFound, Step, Workflow, WorkflowError
from app.components.workflows.loader import load_file
from app.components.workflows.reconciler import Reconciler
from app.components.workflows.runs import DuplicateRun, Workflows

__all__ = ["ContinueOn", "DuplicateRun", "Precondition", "Reconciler", "RunNotFound", "Step", "Workflow",
           "WorkflowError", "Workflows", "load_file"]
