"""The `sleep` kind: N units that each sleep for `seconds` in a Ray task.

A fifth kind written in the tests as any kind from outside `runner/` would be: its package
(schema, check and plan, the task, its `StageRun`) and one registry line, nothing else. It
is registered by `runner.stages.registry.register` in this process, and by
`RUNNER_KINDS=sleep=tests.kinds.sleep.kind:KIND` in a runner started as a subprocess.

Its modules are imported one by one (as the shipped kinds'): a Ray worker that runs
`task.sleep_unit` imports only `task`.
"""
