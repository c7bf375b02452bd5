"""The `roles` stage: long-running role replicas (train / reward / rollout) with priorities,
placement-group pools and preemption.

Each replica is a unit. It asks the run's one scheduler for its resources at its role's
priority; a replica of a role with preemption rights may take the resources of lower ones, as
`runner.scheduler.policy` decides. A victim is asked to stop (`ctx.cancelled`), given
`cancel_timeout` seconds, then killed; its `state()` is saved and it goes back to pending, to
be restored with `restore(state)` when it is admitted again. ScheduleMesh's faults are designed
out: the timeout is honoured, several victims may be taken, label preemptions are counted as
`label`, placement groups are reused by best fit, and every group's readiness is waited for
with a bound.

The package's modules are imported one by one (`runner.stages.registry` puts the kind
together): its Ray-side module is imported by fresh worker processes, which must not pay
for the driver's modules.
"""
