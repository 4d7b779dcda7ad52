"""Cron and interval schedules that enqueue jobs, exactly once per tick, on any engine.

    from datetime import timedelta
    from app.components.worker import Schedule

    class WorkerSettings:
        functions = [cleanup_temp_files]
        schedules = [Schedule(cleanup_temp_files, cron="0 3 * * *", tz="Europe/Berlin",
                              kwargs={"days_old": 3}, catchup_window=timedelta(hours=6), overlap="skip")]

Modules: schedule (the definition), ticks (cron/interval instants and the DST policy), plan
(what a pass does: catchup, misfire grace, overlap), loader (WorkerSettings and the YAML
file), store (state in Redis, claim.lua / recover.lua), scheduler (the loop).
"""

from app.components.scheduler.loader import Bound, collect, read_file
from app.components.scheduler.schedule import Schedule, ScheduleError
from app.components.scheduler.scheduler import PassReport, Scheduler

__all__ = ["Bound", "PassReport", "Schedule", "ScheduleError", "Scheduler", "collect", "read_file"]
