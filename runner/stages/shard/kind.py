"""How a shard stage runs in the unit loop: one lease per shard (its CPUs and GPUs on one
node), one task there (`run_shard`), a commit on the runner's side, the shards' output on the
terminal, and the merge."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import cast

from runner import disk, procs
from runner.calls import Expect, Remote
from runner.carry import pack, under
from runner.cluster import ClusterInfo
from runner.kind import RunContext, StageOutcome, StageRun, Verdicts
from runner.lease import Ask, Lease, Work
from runner.lifecycle import UnitState
from runner.output import Tail
from runner.plan import StagePlan
from runner.resources import Resources
from runner.scheduler.request import Request
from runner.stages.shard.files import (
    SHARDS,
    ShardPayload,
    commit,
    launch_values,
    output_format,
    payload_of,
    shard_files,
    tail,
)
from runner.stages.shard.merge import merge, read_table, write_table
from runner.stages.shard.planning import COMMITTED, ShardSettings
from runner.stages.shard.ranges import Shard
from runner.stages.shard.schema import ShardStage
from runner.stages.shard.slots import GpuSlots
from runner.stages.shard.task import ShardJob, ShardReply, run_shard
from runner.verdicts import Done, End, Fail, Failed, Launch, Lend, Record, Requeue, Stopped

log = logging.getLogger(__name__)

# how long a cancelled shard's task gets to kill its command before Ray kills the task
CANCEL_GRACE = 3.0
# how often one shard may land on GPUs short of free memory and go back to the queue without
# spending a retry (where Ray picks the GPUs it may pick the same ones again)
GPU_REQUEUES = 3


class ShardRun(StageRun):
    """Every range queued at once and started as soon as a lease frees up (no batch barrier);
    done only once its output is committed; retried up to `retries`; merged at the end."""

    grace = CANCEL_GRACE
    noun = "shard"

    def __init__(self, stage: StagePlan, ctx: RunContext) -> None:
        assert isinstance(stage.spec, ShardStage)
        self.spec = stage.spec
        self.ctx = ctx
        self.root = ctx.stage_dir(stage.name) / SHARDS
        if not ctx.virtual:
            self.root.mkdir(exist_ok=True)
        units = stage.units or []
        self.shards = {u.id: _shard(payload_of(u)) for u in units}
        self.files = {
            u.id: shard_files(self.root, self.spec, self.shards[u.id].index, len(units))
            for u in units
        }
        # shards the plan found committed by a run that died before its ledger write
        self._adopted_units = [u for u in units if u.reason == COMMITTED]
        self.adopted = len(self._adopted_units)
        super().__init__(stage, ctx)
        self.retries = self.spec.retries
        self.cap = self.spec.max_parallel
        self.cpu = 0.0
        # each shard's log, followed onto the terminal with `show_output`
        self.tail = Tail(ctx.progress)
        self.failures: list[str] = []
        # the GPU groups to ask for by name, where the cluster names its GPUs (else Ray picks)
        groups = stage.settings.gpu_groups if isinstance(stage.settings, ShardSettings) else None
        self.slots = GpuSlots.of(groups, self.spec.gpus_per_shard, ctx.cluster.nodes)
        # without named GPUs every shard asks alike: one request, shared as tickets may share
        self.request = shard_request(self.spec, ctx.cluster)
        self.requeued: Counter[str] = Counter()

    @property
    def fmt(self) -> str:
        return output_format(self.spec)

    def prepare(self) -> Verdicts:
        """Record adopted shards done; write each queued shard's slice of the input; record it
        pending (the ranges then live in the ledger: a resume plans without reading the input)."""
        for unit in self._adopted_units:
            yield Record(Work(self.name, unit, UnitState.done, result={"adopted": True}))
        if not self.works or self.ctx.virtual:
            return
        frame = read_table(Path(self.spec.input))
        ids = frame[self.spec.id_column]
        for work in self.works:
            shard, f = self.shards[work.id], self.files[work.id]
            part = frame[(ids >= shard.low) & (ids <= shard.high)]
            write_table(part.sort_values(self.spec.id_column, kind="stable"), f.input)
            stale = f.part_owner.is_file() and f.part_owner.read_text() != work.unit.fingerprint
            if stale or work.unit.reason == "fresh run":
                f.part.unlink(missing_ok=True)  # not this config's partial output
            procs.reap_group(f.pid)
            yield Record(work)

    def asks(self) -> Iterable[Ask | Lend]:
        """With named GPUs, only as many asks as there are free groups (`ask_for` takes one)."""
        if self.slots is not None:
            room = self.asked + self.slots.spare()
            self.cap = room if self.spec.max_parallel is None else min(self.spec.max_parallel, room)
        return super().asks()

    def ask_for(self, work: Work) -> Ask:
        if self.slots is None:
            return Ask(self.request, work)
        group = self.slots.take()
        resources = self.slots.resources(group, self.spec.cpus_per_shard)
        return Ask(Request(resources, self.spec.priority), work, tag=group)

    def lease_ended(self, lease: Lease) -> None:
        super().lease_ended(lease)
        if self.slots is not None and isinstance(lease.ask.tag, tuple):
            self.slots.give(lease.ask.tag)

    def launch(self, lease: Lease) -> Verdicts:
        work = lease.work[0]
        shard = self.shards[work.id]
        job = None if self.ctx.virtual else self._job(lease, work)  # virtual: never run
        options = {"max_retries": 0, "name": f"shard {shard.label}"}
        expect = partial(self._expect, work)
        yield Launch(
            lease, Remote(run_shard, (job,), options=options, announce=True, expect=expect)
        )

    def _job(self, lease: Lease, work: Work) -> ShardJob:
        """What the shard's task is handed: its command or function, its placeholders' values,
        its GPUs, where it logs; without a shared filesystem, its files too."""
        shard, f = self.shards[work.id], self.files[work.id]
        f.part_owner.write_text(work.unit.fingerprint)
        self.tail.start(f.log)
        job = ShardJob(
            label=shard.label,
            attempt=work.attempts + 1,
            command=self.spec.command,
            fn=self.spec.fn,
            values=launch_values(work.unit, f, self.spec.id_column, work.attempts + 1),
            gpus=self.spec.gpus_per_shard,
            gpu_ids=list(lease.ask.tag) if isinstance(lease.ask.tag, tuple) else None,
            min_gpu_memory_gb=self.spec.min_gpu_memory_gb,
            cwd=os.getcwd(),
            log=str(f.log.resolve()),
            pid=str(f.pid.resolve()),
        )
        if not self.ctx.cluster.shared_fs:  # its files travel with it, and back in its reply
            job["carry_root"] = str(self.root.resolve())
            job["stage_in"] = pack(self.root, [f.input, f.done, f.part, f.log, f.out_dir])
        return job

    def _expect(self, work: Work) -> Expect:
        """A shard in virtual time: it takes what the measured run says, and succeeds."""
        seconds = self.ctx.seconds(self.name, work.id)
        now = self.ctx.wall()
        reply = ShardReply(ok=True, cuda_visible_devices=None, started=now, ended=now + seconds)
        return Expect(seconds, reply)

    def on_reply(self, lease: Lease, tag: object, value: object) -> Verdicts:
        assert isinstance(value, dict)
        reply = cast(ShardReply, value)  # what run_shard (or _expect) answered
        work = lease.work[0]
        files = reply.pop("files", {})
        if files:  # carried back (no shared filesystem)
            failed = self.landed(lease, under(self.root, files))
            if failed:
                yield from failed
                return
        self._show(work)
        if lease.stopping is not None and not reply["ok"]:
            # cancelled (mode=cancel, Ctrl-C): its command was killed, which is no failure
            yield Stopped(lease)
            return
        full = None if self.ctx.virtual else disk.full(self.root, self.ctx.store.root)
        if full is not None:  # its log or output met a full disk: the run stops, one message
            yield Fail(full)
            yield Stopped(lease)
            return
        yield End(lease)
        self.cpu += reply.get("cpu", 0.0)
        requeued = self._requeue(lease, work, reply["requeue"]) if reply.get("requeue") else None
        if requeued is not None:
            yield Requeue(work, requeued)
            return
        shard, f = self.shards[work.id], self.files[work.id]
        if not reply["ok"]:
            error = reply["error"]
        elif self.ctx.virtual:
            error = None
        else:
            error = commit(f, shard, work.unit, self.spec.id_column)
        if reply.get("requeue"):
            error = f"{reply['requeue']} ({GPU_REQUEUES + 1} times in a row: counted as a failure)"
        if error is None:
            result = {
                "rows": shard.rows,
                "output": str(f.output),
                "cuda_visible_devices": reply["cuda_visible_devices"],
                "started": reply["started"],
                "ended": reply["ended"],
            }
            yield Done(work, result, reply["started"], reply["ended"])
            return
        if work.attempts > self.retries:
            last = tail(f.log)
            error = (
                f"shard {shard.label} failed after {work.attempts} attempt(s): {error}; "
                f"last lines of {f.log}:\n" + "\n".join(f"    {ln}" for ln in last)
            )
            self.failures.append(error)
        yield Failed(work, error)

    def _requeue(self, lease: Lease, work: Work, reason: str) -> str | None:
        """Why the shard that landed on GPUs short of free memory, no fault of its own, goes
        back to the queue, no retry spent (None: it does not, after GPU_REQUEUES times it
        counts as a failure). Named GPUs that were short are not asked for again by this
        stage."""
        if self.requeued[work.id] >= GPU_REQUEUES:
            return None
        self.requeued[work.id] += 1
        group = lease.ask.tag
        if self.slots is not None and isinstance(group, tuple) and not self.slots.retire(group):
            reason += f"; GPU(s) {','.join(map(str, group))} not used again by this stage"
        log.warning("%s: shard %s queued again: %s", self.name, self.shards[work.id].label, reason)
        return reason

    def stop(self, lease: Lease) -> Verdicts:
        """Ray interrupts the task, which kills its command's process group; the recorded
        group is killed here too, in case the task cannot run its cleanup."""
        yield from super().stop(lease)
        if not self.ctx.virtual:
            for work in lease.work:
                procs.reap_group(self.files[work.id].pid)

    def tick(self) -> Verdicts:
        for lease in self.leases:
            for work in lease.work:
                self._show(work)
        yield from ()

    def _show(self, work: Work) -> None:
        """Print the complete new lines of a shard's log, prefixed with its range."""
        if self.spec.show_output and not self.ctx.virtual:
            self.tail.show(self.files[work.id].log, f"[shard {self.shards[work.id].label}] ")

    def conclude(self, outcome: StageOutcome) -> StageOutcome:
        outcome.cpu_seconds = self.cpu
        outcome.done += self.adopted
        outcome.skipped -= self.adopted
        if self.ctx.virtual:  # nothing was written: nothing to merge
            return outcome
        sort_by = self.spec.merge.get("sort_by") or self.spec.id_column
        keys = [sort_by] if isinstance(sort_by, str) else [str(k) for k in _listed(sort_by)]
        target = self.ctx.stage_dir(self.name) / f"merged.{self.fmt}"
        units = self.stage.units or []
        summary = merge(
            [self.files[u.id].committed(u.id, u.fingerprint) for u in units],
            self.spec.id_column,
            keys,
            target,
        )
        outcome.outputs += [summary["output"], str(target.parent / "merge_summary.json")]
        outcome.extra = {
            "merged_rows": summary["total_rows"],
            "missing_ranges": summary["missing_ranges"],
            "duplicate_ids": summary["duplicate_ids"],
        }
        # a shard cancelled on purpose (mode=cancel) is left out of the merge, not a failure
        cancelled = {self.shards[w.id].label for w in self.works if w.state is UnitState.cancelled}
        missing = [r for r in summary["missing_ranges"] if r not in cancelled]
        left_out = [r for r in summary["missing_ranges"] if r in cancelled]
        if self.failures:
            outcome.ok = False
            outcome.message = f"{len(self.failures)} shard(s) failed:\n" + "\n".join(self.failures)
        elif missing:
            outcome.ok = False
            outcome.message = f"missing ranges: {', '.join(missing)}"
        elif left_out:
            outcome.message = f"cancelled ranges, not in the merge: {', '.join(left_out)}"
        return outcome


def shard_request(spec: ShardStage, cluster: ClusterInfo) -> Request:
    """A shard's CPUs and GPUs at the stage's priority (without GPU groups from the inventory:
    Ray picks the node's GPUs), on the nodes whose GPUs have `min_gpu_memory_gb` where the
    cluster declares its GPUs' memory (simulated: a real node's is read by the shard's task)."""
    nodes = cluster.gpu_memory_nodes(spec.gpus_per_shard, spec.min_gpu_memory_gb)
    resources = Resources(cpus=spec.cpus_per_shard, gpus=spec.gpus_per_shard)
    return Request(resources, spec.priority, nodes=nodes)


def _shard(payload: ShardPayload) -> Shard:
    return Shard(payload["index"], payload["low"], payload["high"], payload["rows"])


def open_run(stage: StagePlan, ctx: RunContext) -> ShardRun:
    return ShardRun(stage, ctx)


def _listed(value: object) -> list[object]:
    """The columns of a `merge.sort_by` given as a list (its check allows a string or a list)."""
    return value if isinstance(value, list) else []
