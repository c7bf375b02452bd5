"""The `shard` stage: a dataset cut into id ranges, each run by a command or a function on its
own GPU group, outputs committed one by one and merged.

Hand-rolled launchers (R2R's `auto_scheduler.py`) mark a range done when its worker *starts*,
drop ranges beyond the free GPU groups, wait for the slowest worker of each batch, and merge
whatever files lie in the directory. Here a shard is done only once its output is complete and
committed (row count checked, renamed, manifest written, then the ledger row); every range is
queued and runs as soon as a GPU group frees up (no batch barrier); Ray owns GPU placement, so
two shards never share a GPU; the merge reads the manifests of this plan only.

Ranges are over the sorted unique ids, so they do not depend on the file's row order. A
shard's fingerprint hashes the stage's result config, its range and the input's identity
(path and content digest, kept in the ledger by path, size and mtime): a resumed run decides
from metadata and the ledger, never by parsing the data. Files of a shard live in
`<run.dir>/<stage>/shards/` under `shard-NNNN.*`.

The package's modules are imported one by one (`runner.stages.registry` puts the kind
together): its Ray-side module is imported by fresh worker processes, which must not pay
for the driver's modules.
"""
