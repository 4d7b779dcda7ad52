"""Routing: what decides when and where a job may start, and what happens to the ones that end
badly. Dead letters (``dead``) keep the jobs that ended failed, per queue, for a retry."""
