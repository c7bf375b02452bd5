"""The `jobs` stage: heterogeneous shell jobs, each with its own resources, run as far as they fit.

It replaces a home-made Slurm-like service, and is built against that service's faults. Every
job is a Ray task asking Ray for exactly its CPUs, memory and GPUs, so Ray's own accounting
holds the limits (no counter of ours can drift), after the run's scheduler has admitted it by
priority. A job runs in a process group that holds only its processes while it runs (its Ray
worker's, which runs one job at a time), killed whole at its end, at its time limit, on Ctrl-C
and when its Ray worker dies (a watcher process outlives the worker and ends the group), so
nothing a job started is left running. A job whose worker dies is retried or marked failed,
never left running; a job's own failure is final and its siblings go on.

The package's modules are imported one by one (`runner.stages.registry` puts the kind
together): its Ray-side module is imported by fresh worker processes, which must not pay
for the driver's modules.
"""
