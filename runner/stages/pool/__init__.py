"""The `pool` stage: N long-lived Ray actors calling a worker object on a stream of items.

`schema.py` its keys · `items.py` its item sources · `kind.py` its checks, plan and
`StageRun` · `worker.py` what runs inside a worker's actor · `results.py` the stage's
`results.parquet`.

Nothing is imported here: a Ray worker imports `worker.py` alone (and this package first), and
must not pay for the driver's modules (`runner.stages.registry` puts the kind together).
"""
