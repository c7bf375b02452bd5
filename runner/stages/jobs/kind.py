"""How a jobs stage runs in the unit loop: one lease per job with the job's own resources, one
task on the granted node (`run_job`), its outcome read from the task's reply."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from runner import disk
from runner.calls import Expect, Remote
from runner.carry import Dest
from runner.identity import digest
from runner.jsondata import line_error
from runner.kind import RunContext, StageOutcome, StageRun, Verdicts
from runner.lease import Ask, Lease, Work
from runner.lifecycle import UnitState
from runner.output import Tail
from runner.plan import StagePlan, Unit
from runner.remote import plain
from runner.scheduler.request import Request
from runner.stages.jobs.job import Job, closes, complete_lines, read_line
from runner.stages.jobs.planning import JobsSettings
from runner.stages.jobs.schema import JobsStage
from runner.stages.jobs.task import run_job
from runner.verdicts import End, Ended, Fail, Launch, Record, Stopped

log = logging.getLogger(__name__)

# how often a followed jobs_file is read for new lines
FOLLOW_EVERY = 0.5
# seconds a cancelled job's task gets, beyond its cancel_grace, before Ray kills the task
CANCEL_WAIT = 2.0


class JobsRun(StageRun):
    """Jobs in order, as far as the cluster (and `max_concurrent`) allows; a job's own failure
    is final, a dead Ray worker starts it again up to `retries`."""

    noun = "job"

    def __init__(self, stage: StagePlan, ctx: RunContext) -> None:
        super().__init__(stage, ctx)
        assert isinstance(stage.spec, JobsStage)
        self.spec = stage.spec
        self.retries = self.spec.retries
        self.grace = self.spec.cancel_grace + CANCEL_WAIT
        self.cap = self.spec.max_concurrent
        self.logs = str(ctx.stage_dir(stage.name).resolve())
        # the stream files an earlier run of this directory left in the stage's folder: a
        # first attempt removes its own only when there is one (a removal that fails costs
        # as much as one that does, per stream of every job)
        self.earlier = _files_in(self.logs) if not ctx.virtual else set()
        self.cpu = 0.0
        # CPU-seconds and jobs run per SCNS `account`, for the summary
        self.accounts: dict[str, Usage] = {}
        # requests by what a job asks (`ask_for`)
        self.requests: dict[tuple[object, ...], Request] = {}
        # highest priority first also where `max_concurrent` holds asks back
        self.queue = deque(sorted(self.works, key=lambda w: -_job(w).priority))
        if not ctx.virtual:  # a simulated run writes no rows
            for work in self.works:
                work.record = _job(work).record()
                work.result = self._paths(work)
        # follow: the jobs_file lines read so far, and whether its close line came
        self.follow = Follow(self.spec.follow and self.spec.jobs_file is not None)
        # the running jobs' .out/.err, followed onto the terminal with `show_output`
        self.tail = Tail(ctx.progress)

    def prepare(self) -> Verdicts:
        for work in self.works:  # every queued job shows as PENDING from the start
            yield Record(work)

    def ask_for(self, work: Work) -> Ask:
        """Its own resources at its own priority; a job that does not fit reserves its node,
        and jobs behind it backfill only when their time limit ends them before it starts.
        Jobs that ask alike (an array's) share one request, as tickets may."""
        job = _job(work)
        nodes = self._nodes_of(job.partition)
        key = (job.resources, job.priority, job.time_limit, job.exclusive, nodes)
        request = self.requests.get(key)
        if request is None:
            request = self.requests[key] = job_request(job, nodes)
        return Ask(request, work)

    def _nodes_of(self, partition: str | None) -> frozenset[int] | None:
        """The nodes a job of `partition` may run on: on a Ray cluster, those whose labels
        name it among the nodes known when it asks (a node that joined before then counts);
        elsewhere every node has the declared partitions (None: any node)."""
        if partition is None or not self.ctx.cluster.node_partitions:
            return None
        return frozenset(i for i, n in enumerate(self.ctx.nodes) if partition in n.partitions)

    def launch(self, lease: Lease) -> Verdicts:
        work = lease.work[0]
        paths = self._paths(work)
        if not self.ctx.virtual:
            for stream in ("stdout", "stderr"):  # each attempt writes its files afresh
                path = paths[stream]
                if work.attempts or path in self.earlier or not path.startswith(self.logs + "/"):
                    with contextlib.suppress(FileNotFoundError):  # not an earlier one's lines
                        os.unlink(path)
                if self.spec.show_output:
                    self.tail.start(Path(path), fresh=True)
        carried = not self.ctx.cluster.shared_fs
        spec = {
            **_job(work).task_spec(),
            "grace": self.spec.cancel_grace,
            "stdout": plain(Dest(paths["stdout"], carried)),
            "stderr": plain(Dest(paths["stderr"], carried)),
        }
        # one name for the stage's tasks in Ray's dashboard (the ledger says which job ran
        # where): options that differ per job would be made and checked by Ray for each one
        options = {"max_retries": 0, "name": f"{self.name} job"}
        expect = partial(self._expect, work)
        yield Launch(lease, Remote(run_job, (spec,), options=options, announce=True, expect=expect))

    def _expect(self, work: Work) -> Expect:
        """A job in virtual time: it takes what the measured run says, and succeeds."""
        seconds = self.ctx.seconds(self.name, work.id)
        now = self.ctx.wall()
        reply = {
            "state": UnitState.done.value,
            "exit_code": 0,
            "started": now,
            "ended": now + seconds,
        }
        return Expect(seconds, reply)

    def on_reply(self, lease: Lease, tag: object, value: object) -> Verdicts:
        assert isinstance(value, dict)
        reply: dict[str, Any] = value
        work = lease.work[0]
        files = reply.pop("files", {})
        if files:  # streams carried back (no shared filesystem)
            failed = self.landed(lease, files)
            if failed:
                yield from failed
                return
        self._show(work)
        paths = self._paths(work)
        root = self.ctx.store.root
        full = None if self.ctx.virtual else disk.full(os.path.dirname(paths["stdout"]), root)
        if full is not None:  # its streams met a full disk: the run stops, one message; the
            yield Fail(full)  # job is not recorded done or failed (a rerun runs it)
            yield Stopped(lease)
            return
        yield End(lease)
        self.cpu += reply.get("cpu", 0.0)
        account = _job(work).account
        if account is not None:
            self.accounts.setdefault(account, Usage()).add(reply.get("cpu", 0.0))
        details = {k: reply.get(k) for k in ("exit_code", "signal", "pid")}
        details |= {k: reply[k] for k in ("memory_limit", "peak_rss") if k in reply}
        yield Ended(
            work,
            UnitState(reply["state"]),
            {**details, **paths},
            reply.get("error"),
            reply.get("started"),
            reply.get("ended"),
        )

    def tick(self) -> Verdicts:
        """Show the running jobs' new output lines; with `follow`, run the jobs appended to
        jobs_file since the last look."""
        for lease in self.leases:
            for work in lease.work:
                self._show(work)
        if not self.follow.due():
            return
        assert self.spec.jobs_file is not None
        path = Path(self.spec.jobs_file)
        try:
            lines = complete_lines(path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("%s: cannot read %s: %s", self.name, path, exc)
            return
        known = {u.id for u in self.stage.units or []}
        for n in range(self.follow.lines, len(lines)):
            self.follow.lines = n + 1
            where = f"{path} line {n + 1}"
            if not lines[n].strip():
                continue
            try:
                data = json.loads(lines[n].rstrip("\r\n"))
            except ValueError as exc:
                log.warning("%s: %s is not JSON %s; skipped", self.name, where, line_error(exc))
                continue
            if closes(data):
                self.follow.closed = True
                return
            jobs, problems = read_line(self.name, self.spec, data, where)
            for problem in problems:
                log.warning("%s: %s; skipped", self.name, problem)
            for job in jobs:
                if job.id not in known:
                    known.add(job.id)
                    yield from self._add(job)

    def due(self) -> float | None:
        """A followed jobs_file is read again every FOLLOW_EVERY seconds."""
        if not self.follow.on or self.follow.closed:
            return None
        return self.ctx.clock() + FOLLOW_EVERY

    def _add(self, job: Job) -> Verdicts:
        """A job that arrived while the stage runs: skipped when the ledger has it done with
        the same fingerprint (a resumed run), failed when no node could ever hold it."""
        assert isinstance(self.stage.settings, JobsSettings)
        unit = Unit(job.id, digest(job.identity(), *self.stage.settings.upstream), job)
        assert self.stage.units is not None
        self.stage.units.append(unit)
        prior = self.ctx.ledger.prior_units(self.name).get(job.id)
        if (
            prior is not None
            and prior.state is UnitState.done
            and prior.fingerprint == unit.fingerprint
        ):
            unit.run = False
            return
        work = Work(self.name, unit)
        work.record, work.result = job.record(), self._paths(work)
        self.works.append(work)
        self.left += 1
        yield Record(work)
        partitions = self.ctx.cluster.partitions
        if job.partition is not None and partitions is not None and job.partition not in partitions:
            yield Ended(work, UnitState.failed, error=f"no node has partition {job.partition!r}")
        elif not any(job.resources.fits_in(node.capacity) for node in self.ctx.nodes):
            need = job.resources.describe()
            yield Ended(work, UnitState.failed, error=f"no node can hold {need}")
        else:
            self.queue.append(work)

    def busy(self) -> bool:
        """A followed stage runs until its close line, and then until its jobs end."""
        following = self.follow.on and not self.follow.closed and not self.ctx.stop.is_set()
        return following or super().busy()

    def conclude(self, outcome: StageOutcome) -> StageOutcome:
        outcome.cpu_seconds = self.cpu
        outcome.outputs.append(str(self.ctx.stage_dir(self.name)))
        if self.accounts:
            outcome.extra["accounts"] = {
                name: {"jobs": u.jobs, "cpu_s": round(u.cpu, 3)}
                for name, u in sorted(self.accounts.items())
            }
        return super().conclude(outcome)

    def _show(self, work: Work) -> None:
        """With `show_output`, print the complete new lines of a job's stdout and stderr above
        the progress bars, prefixed with its name."""
        if not self.spec.show_output:
            return
        paths = self._paths(work)
        self.tail.show(Path(paths["stdout"]), f"[job {work.id}] ")
        self.tail.show(Path(paths["stderr"]), f"[job {work.id} stderr] ")

    def _paths(self, work: Work) -> dict[str, str]:
        """Where a job's streams go: SCNS's `standard_output` / `standard_error` when the job
        names them, else <run.dir>/<stage>/<job>.out and .err (strings, not Paths: asked for
        a few times per job)."""
        job = _job(work)
        return {
            "stdout": job.stdout or f"{self.logs}/{work.id}.out",
            "stderr": job.stderr or f"{self.logs}/{work.id}.err",
        }


@dataclass
class Usage:
    """What the jobs of one account used: how many ran, and their CPU-seconds."""

    jobs: int = 0
    cpu: float = 0.0

    def add(self, cpu: float) -> None:
        self.jobs += 1
        self.cpu += cpu


@dataclass
class Follow:
    """Where the reading of a followed jobs_file is."""

    on: bool
    lines: int = 0
    closed: bool = False
    seen: float = 0.0

    def due(self) -> bool:
        """Following, not closed, and FOLLOW_EVERY since the last look."""
        now = time.monotonic()
        if not self.on or self.closed or now - self.seen < FOLLOW_EVERY:
            return False
        self.seen = now
        return True


def job_request(job: Job, nodes: frozenset[int] | None = None) -> Request:
    """Its own resources at its own priority, on `nodes` (its partition's) when given, and a
    whole node to itself when `exclusive`; a job that does not fit reserves its node, and jobs
    behind it backfill only when their time limit ends them before it starts."""
    return Request(
        job.resources,
        job.priority,
        duration=job.time_limit,
        reserve=True,
        nodes=nodes,
        exclusive=job.exclusive,
    )


def _job(work: Work) -> Job:
    job = work.unit.payload
    assert isinstance(job, Job)  # the jobs planner's payload
    return job


def open_run(stage: StagePlan, ctx: RunContext) -> JobsRun:
    return JobsRun(stage, ctx)


def _files_in(folder: str) -> set[str]:
    """The paths of the files in `folder` (none when it is not there)."""
    try:
        return {f"{folder}/{name}" for name in os.listdir(folder)}
    except OSError:
        return set()
