"""The `jobs` stage: heterogeneous shell jobs, each with its own resources, run as far as they fit.

It replaces a home-made Slurm-like service, and is built against that service's faults. Every
job is a Ray task asking Ray for exactly its CPUs, memory and GPUs, so Ray's own accounting
holds the limits (no counter of ours can drift), after the run's scheduler has admitted it by
priority. A job runs in a process group that holds only its processes while it runs (its Ray
worker's, which runs one job at a time), killed whole at its end, at its time limit, on Ctrl-C
and when its Ray worker dies (a watcher process outlives the worker and ends the group), so
nothing a job started is left running. A job whose worker dies is retried or marked failed,
never left running; a job's own failure is final and its siblings go on.
"""

from __future__ import annotations

from runner.kind import StageKind
from runner.schema import JobsStage
from runner.stages.jobs.job import Job, array_indices, load_jobs
from runner.stages.jobs.kind import JobsRun, open_run
from runner.stages.jobs.planning import check, plan
from runner.stages.jobs.simulate import simulate
from runner.stages.jobs.task import run_job

__all__ = ["KIND", "Job", "JobsRun", "array_indices", "check", "load_jobs", "plan", "run_job"]

KIND = StageKind(JobsStage, check, plan, open_run, simulate)
