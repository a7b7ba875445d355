"""The Features page's import point for its background jobs, whose engine is :mod:`core.interp.jobs`
(launch, read, list, stop, progress from the job's events file). pages/features.py and
pages/parts/features_completion.py import ``list_jobs``, ``short`` and ``usable_path`` from here;
new code should import from core.interp.jobs directly.
"""
from core.interp.jobs import (ACTIONS, JOB_KIND, JOBS_DIR, Job, _CHILDREN, console_lines, job_argv,  # noqa: F401
                              jobs_root, launch, list_jobs, progress, read_job, short, stop, usable_path)
from core.jobs.events import Progress  # noqa: F401
