"""Overseer: the live web dashboard and Prometheus metrics of every queue, worker and job."""

from app.components.overseer.app import create_app, overseer_router

__all__ = ["create_app", "overseer_router"]
