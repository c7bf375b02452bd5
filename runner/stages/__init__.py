"""Stage kinds, one module or package each; `runner.stages.registry.KINDS` is the registry.

Nothing is imported here: a Ray worker that imports a kind's worker-side module
(`pool.worker`, `jobs.task`, `shard.task`, `roles.host`) imports this package first, and
must not pay for the driver's modules (about 0.15 s a fresh worker).
"""
