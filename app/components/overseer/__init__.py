"""Overseer: the live web dashboard and Prometheus metrics of every queue, worker and job."""

from app.components.overseer.app import add_error_handlers, create_app, overseer_router

__all__ = ["add_error_handlers", "create_app", "overseer_router"]
