"""A Hydra sweep's jobs side by side on one Ray (`hydra/launcher=runner`, the plugin in
`hydra_plugins/runner_launcher`, hands its `launch` here).

Hydra's basic launcher runs a sweep's jobs one after another, and each runner pipeline job
starts its own embedded Ray (5–6 s a job). Here the sweep starts Ray once (or connects to the
cluster), and its jobs run at the same time, each on a thread of this process, every unit of
every job admitted by one scheduler over the cluster's nodes, so that the jobs together never
hold more than the cluster has:

- a runner pipeline's job (`runner -m ...`) is the runner's own run of its spec
  (`cli.run_spec`) with its run directory, ledger and progress lines, its units admitted by the
  shared scheduler beside every other job's (`execute.Sharing`), with their own priorities;
- another Hydra app's job is one unit: a Ray task that runs Hydra's `run_job` (the job's
  directory, its working directory, the driver's Hydra state and resolvers) holding
  `hydra.launcher.resources` on the node the scheduler chose; Ray gives a GPU job GPUs no
  other job holds and sets `CUDA_VISIBLE_DEVICES` to them.

`max_parallel` caps the jobs at once (default: as many as fit). A job is known by its sweep
directory and its overrides, not by its number (the Optuna sweeper numbers from 0 on every
invocation): a finished app job's return value is kept under `.runner_sweep/`, so the same
sweep run again returns it without running the job; a pipeline job resumes from its ledger
(finished: nothing runs). Ctrl-C / SIGTERM stop every job with its grace, and the sweep exits
130 / 143 once all have stopped.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import functools
import logging
import marshal
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from runner import app_job, errors, procs, sweep
from runner import cluster as clusters
from runner.cluster import RayNode
from runner.errors import ClusterLost, Interrupted, RunnerError, SweepJobFailed
from runner.execute import Sharing, stop_on_signals
from runner.identity import digest
from runner.quantities import memory_bytes
from runner.resources import Resources
from runner.scheduler import Scheduler
from runner.scheduler.request import Request
from runner.schema import ClusterConfig, Mode
from runner.snapshot import latest_overrides
from runner.spec import Spec
from runner.store import RAY_PIDS, SUMMARY, hold

if TYPE_CHECKING:
    from ray._private.worker import RemoteFunction4

    RemoteRun = RemoteFunction4[
        JobReturn, DictConfig, HydraContext, TaskFunction, dict[object, object], str
    ]

    from hydra_plugins.runner_launcher.runner_launcher import RunnerLauncher

log = logging.getLogger(__name__)

# what a Hydra app's job takes into its Ray task beside its config: the driver's Hydra
# context, task, Hydra state and working directory
Carried = tuple[HydraContext, TaskFunction, dict[object, object], str]

# a finished app job's return value, by its task and overrides, in the sweep directory
KEPT = ".runner_sweep"
# seconds a stopped app job has to end after its KeyboardInterrupt, before it is killed
GRACE = 5.0
# seconds between looks at a job's task and at the stop event
POLL = 0.2


@dataclass
class Job:
    """One job of the sweep: its number, overrides and composed config, and how it ended."""

    idx: int
    overrides: list[str]
    config: DictConfig
    # Hydra's record of the job (set up by `run_job`), its status and value set at the end
    ret: JobReturn | None = None
    spec: Spec | None = None

    @property
    def name(self) -> str:
        return _name(self.overrides, self.config) or f"#{self.idx}"

    @property
    def key(self) -> str:
        """The job's identity in its sweep directory: its overrides, in any order."""
        return digest(*sorted(self.overrides))


@dataclass
class Sweep:
    """What the sweep's jobs share while they run."""

    scheduler: Scheduler
    nodes: list[RayNode]
    stop: threading.Event
    caught: list[int]


def launch(
    launcher: RunnerLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> list[JobReturn]:
    """Run the batch of jobs side by side; one `JobReturn` per job, in input order, once all
    have ended (a failed job does not stop the others)."""
    config, context, task = launcher.config, launcher.hydra_context, launcher.task_function
    assert config is not None and context is not None and task is not None
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        _compose(context, config, list(overrides), initial_job_idx + n)
        for n, overrides in enumerate(job_overrides)
    ]
    log.info("runner launcher: %d job(s), sweep directory %s", len(jobs), sweep_dir)
    # the same overrides twice in a batch (a sampler may suggest a point again): one job, in
    # the one directory they name, whose return both get
    first: dict[str, Job] = {}
    unique = [job for job in jobs if first.setdefault(job.key, job) is job]
    if _is_pipeline(task):
        _pipelines(launcher, context, unique, sweep_dir)
    else:
        _apps(launcher, context, task, unique, sweep_dir)
    return [job.ret or _same_as(job, first[job.key]) for job in jobs]


def _is_pipeline(task: TaskFunction) -> bool:
    """Whether the sweep's task is the `runner` command's own. `runner.cli` is imported only
    for it: importing it hooks the runner's spec checks into Hydra, which another app's
    sweep must not meet."""
    runner_cli = sys.modules.get("runner.cli")
    return runner_cli is not None and bool(runner_cli.is_pipeline(task))


def _same_as(job: Job, ran: Job) -> JobReturn:
    assert ran.ret is not None
    ret = _record(job)
    ret.status, ret.return_value = ran.ret.status, ran.ret._return_value
    return ret


def _compose(context: HydraContext, config: DictConfig, overrides: list[str], idx: int) -> Job:
    sweep_config = context.config_loader.load_sweep_config(config, overrides)
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"job_id_for_{idx}"
        sweep_config.hydra.job.num = idx
    return Job(idx, overrides, sweep_config)


def _side_by_side(
    cluster: ClusterConfig,
    pids: Path,
    jobs: list[Job],
    max_parallel: int | None,
    run_one: Callable[[Job, Sweep], None],
) -> None:
    """One Ray for the sweep, one scheduler over its nodes, and each job on a thread; the
    first SIGINT/SIGTERM stops them all (each with its grace), a second ends the process."""
    if not jobs:
        return
    try:
        lock = hold(pids.parent, "sweep directory", "set hydra.sweep.dir to another directory")
    except RunnerError as exc:  # one line, not Hydra's report of an exception
        raise SystemExit(errors.report(exc)) from None
    try:
        _run_side_by_side(cluster, pids, jobs, max_parallel, run_one)
    finally:
        os.close(lock)


def _run_side_by_side(
    cluster: ClusterConfig,
    pids: Path,
    jobs: list[Job],
    max_parallel: int | None,
    run_one: Callable[[Job, Sweep], None],
) -> None:
    procs.reap_recorded(pids)  # the Ray of a sweep that was SIGKILLed
    stop = threading.Event()
    # signals first: one while Ray starts stops the sweep once it runs, before any job
    with stop_on_signals(stop) as caught, clusters.connected(cluster, pids, caught) as info:
        nodes = info.ray_nodes()
        shared = Sweep(Scheduler([n.capacity for n in nodes]), nodes, stop, caught)
        workers = max(1, min(max_parallel or len(jobs), len(jobs)))
        with cf.ThreadPoolExecutor(workers, thread_name_prefix="sweep-job") as pool:
            pending = {pool.submit(run_one, job, shared) for job in jobs}
            while pending:  # short waits: the main thread stays free for the signal handler
                _, pending = cf.wait(pending, timeout=POLL)
        gone = clusters.lost()
        if gone is not None:  # every job's cluster: one line for the sweep, not one a job
            errors.report(gone.of_sweep())
    if caught:
        raise SystemExit(128 + caught[0])


# --- runner pipelines ------------------------------------------------------------------------


def _pipelines(
    launcher: RunnerLauncher, context: HydraContext, jobs: list[Job], sweep_dir: Path
) -> None:
    """Validate every job first (an invalid one fails alone, exit 2); plan, status, report,
    cancel and `cluster=sim` jobs need no Ray and run here at once; the others side by side."""
    from runner import cli  # imported by the `runner` command already: no hooks added here

    running: list[Job] = []
    for job in jobs:
        job.ret = run_job(
            hydra_context=context,
            task_function=_loader(job),
            config=job.config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
            configure_logging=False,
        )
        if job.spec is None:  # invalid: said in one line already
            error = job.ret._return_value
            code = error.exit_code if isinstance(error, RunnerError) else 1
            cli.note_exit(code)
            why = "its spec is invalid, as said above" if code == 2 else "as said above"
            job.ret.return_value = SweepJobFailed(job.name, code, why)
            continue
        if job.spec.mode is Mode.run and job.spec.cluster.kind != "sim":
            running.append(job)
        else:
            _at_once(job, launcher.objective)
    try:
        _side_by_side_pipelines(launcher, running, sweep_dir)
    finally:
        if running or any(job.spec is None for job in jobs):  # not for plan / status alone
            _summarize(sweep_dir, jobs)


def _at_once(job: Job, objective: str | None) -> None:
    """A job that needs no Ray (plan, status, report, cancel, `cluster=sim`), run here; an
    error of its own (a plan that cannot fit, no run to cancel) is its one line, as in a
    single run."""
    from runner import cli

    assert job.spec is not None
    HydraConfig.instance().set_config(job.config)
    try:
        code, why = cli.dispatch(job.spec), None
    except RunnerError as exc:
        code, why = errors.report(exc), "as said above"
    _ended(job, code, None, objective, why)


def _side_by_side_pipelines(launcher: RunnerLauncher, jobs: list[Job], sweep_dir: Path) -> None:
    """The pipeline jobs to run, on the cluster of the first one's `cluster` section."""
    if not jobs:
        return
    first = jobs[0].spec
    assert first is not None
    for job in jobs[1:]:
        if job.spec is not None and job.spec.cluster != first.cluster:
            log.warning(
                "%s: its cluster section differs from %s's; the sweep runs all its jobs on "
                "one Ray, the first job's",
                job.name,
                jobs[0].name,
            )
    _console_log(jobs)
    handlers = [_job_log(job) for job in jobs]
    try:
        _side_by_side(
            first.cluster,
            sweep_dir / RAY_PIDS,
            jobs,
            launcher.max_parallel,
            lambda job, sweep: _run_pipeline(job, sweep, launcher.objective),
        )
    finally:
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _name(overrides: list[str], config: DictConfig) -> str:
    """A job as the sweep's summary and log lines name it: its overrides, those its
    directory's name leaves out hidden (but the pipeline)."""
    hidden = config.hydra.job.config.override_dirname.exclude_keys
    return sweep.job_name(filter_overrides(overrides), hidden)


def _summarize(sweep_dir: Path, jobs: list[Job]) -> None:
    """The sweep's summary: this batch's jobs (an invalid one too) and every job the sweep
    directory holds from earlier batches and attempts."""
    named = {Path(str(job.config.hydra.runtime.output_dir)).resolve(): job.name for job in jobs}
    for found in sorted(sweep_dir.resolve().glob(f"*/{SUMMARY}")):
        if found.parent not in named:  # named as this batch's jobs are, from its overrides
            ran = latest_overrides(found.parent)
            name = _name(ran, jobs[0].config) if ran is not None and jobs else ""
            named[found.parent] = name or found.parent.name
    sweep.summarize(sweep_dir, [(name, where) for where, name in named.items()])


def _loader(job: Job) -> TaskFunction:
    """The task `run_job` runs for a pipeline job before the sweep starts: its spec checked
    (Hydra has set up its directory, snapshot and config by then)."""

    from runner import cli

    def load(cfg: DictConfig) -> None:
        try:
            job.spec = cli.load_spec(cfg)
        except RunnerError as exc:
            errors.report(exc)
            raise

    return load


def _run_pipeline(job: Job, sweep: Sweep, objective: str | None) -> None:
    from runner import cli

    assert job.spec is not None and job.ret is not None
    threading.current_thread().name = f"sweep-job-{job.idx}"
    sharing = Sharing(sweep.scheduler, sweep.nodes, sweep.caught, sweep.stop, f"[{job.name}] ")
    summary: dict[str, object] | None = None
    why = None
    try:
        if (gone := clusters.lost()) is not None:  # lost while this job waited its turn
            raise gone
        code, summary = cli.run_spec(job.spec, sharing)
    except Interrupted as exc:
        code = exc.exit_code
    except ClusterLost as exc:  # every job's: said once for the sweep (`_run_side_by_side`)
        code, why = exc.exit_code, "the sweep lost its Ray cluster, as said above"
    except RunnerError as exc:
        code = errors.report(exc)
    except Exception as exc:  # a fault of the runner's own: this job fails, the others go on
        log.exception("%s: failed", job.name)
        job.ret.status, job.ret.return_value = JobStatus.FAILED, exc
        return
    _ended(job, code, summary, objective, why)


def _ended(
    job: Job,
    code: int,
    summary: dict[str, object] | None,
    objective: str | None,
    why: str | None = None,
) -> None:
    """A pipeline job's status and value: its summary (or its `objective` key), or the exit
    code as the failure (`why`: what the failure's line adds; by default the run directory)."""
    from runner import cli

    assert job.ret is not None and job.spec is not None
    cli.note_exit(code)
    if summary is None:
        summary = _stored_summary(Path(job.spec.run.dir))
    if code:
        job.ret.status = JobStatus.FAILED
        job.ret.return_value = SweepJobFailed(job.name, code, why or f"see {job.spec.run.dir}")
        return
    job.ret.status = JobStatus.COMPLETED
    job.ret.return_value = _objective(summary, objective) if summary is not None else None


def _stored_summary(run_dir: Path) -> dict[str, object] | None:
    import json

    try:
        found = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _objective(summary: dict[str, object], objective: str | None) -> object:
    """`objective` (a dotted key of summary.json) of the summary, or the whole summary."""
    if objective is None:
        return summary
    found = OmegaConf.select(OmegaConf.create(summary), objective, default=None)
    if found is None:
        raise RunnerError(f"hydra.launcher.objective={objective}: no such key in summary.json")
    return OmegaConf.to_object(found) if OmegaConf.is_config(found) else found


def _console_log(jobs: list[Job]) -> None:
    """The jobs' logging as a single run's (`hydra.job_logging`: the runner's messages on the
    terminal, each line named by its job), without its one log file: each job writes its own
    (`_job_log`)."""
    configure_log(jobs[0].config.hydra.job_logging, jobs[0].config.hydra.verbose)
    root = logging.getLogger()
    names = {f"sweep-job-{job.idx}": job.name for job in jobs}

    def named(record: logging.LogRecord) -> bool:
        if (name := names.get(record.threadName or "")) is not None:
            record.msg = f"[{name}] {record.msg}"
        return True

    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
        else:
            handler.addFilter(named)


def _job_log(job: Job) -> logging.Handler:
    """The job's own `runner.log` in its run directory: the records of its thread."""
    assert job.spec is not None
    handler = logging.FileHandler(Path(job.spec.run.dir) / "runner.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    thread = f"sweep-job-{job.idx}"
    handler.addFilter(lambda record: record.threadName == thread)
    logging.getLogger().addHandler(handler)
    return handler


# --- any other Hydra app -----------------------------------------------------------------


def _apps(
    launcher: RunnerLauncher,
    context: HydraContext,
    task: TaskFunction,
    jobs: list[Job],
    sweep_dir: Path,
) -> None:
    # keyed by the task too: two apps may share a sweep directory and their overrides
    kept = sweep_dir / KEPT / _task_identity(task)
    to_run = []
    for job in jobs:
        job.ret = _kept(kept, job)
        if job.ret is None:
            to_run.append(job)
        else:
            log.info("#%d %s: finished before; its value kept", job.idx, job.name)
    if not to_run:
        return
    resources = _app_resources(launcher)
    address = os.environ.get("RAY_ADDRESS") or launcher.address
    cluster = ClusterConfig(
        kind="ray" if address else "local",
        address=address,
        num_cpus=launcher.num_cpus,
        num_gpus=launcher.num_gpus,
    )
    carried: Carried = (context, task, Singleton.get_state(), os.getcwd())

    def run_one(job: Job, sweep: Sweep) -> None:
        job.ret = _run_app(job, sweep, resources, carried)
        if job.ret.status is JobStatus.COMPLETED:
            _keep(kept, job)

    _side_by_side(cluster, sweep_dir / RAY_PIDS, to_run, launcher.max_parallel, run_one)


def _task_identity(task: TaskFunction) -> str:
    """The task function's dotted name (a callable object's: its class's) and a digest of its
    code: a finished job's value is reused only while the code that made it is unchanged."""
    named = task if hasattr(task, "__qualname__") else type(task)
    code = getattr(task, "__code__", None)
    made_by = digest(marshal.dumps(code).hex()) if code is not None else "object"
    return f"{named.__module__}.{named.__qualname__}-{made_by}"


def _app_resources(launcher: RunnerLauncher) -> Resources:
    conf = launcher.resources
    cpus = float(conf.cpus) if conf is not None else 1.0
    gpus = float(conf.gpus) if conf is not None else 0.0
    memory = memory_bytes(conf.memory) if conf is not None and conf.memory else None
    return Resources(cpus=cpus, gpus=gpus, memory=float(memory or 0))


def _run_app(job: Job, sweep: Sweep, resources: Resources, carried: Carried) -> JobReturn:
    """One app job: granted by the sweep's scheduler, then Hydra's `run_job` in a Ray task on
    the chosen node; its grant given back when it ends."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not any(resources.fits_in(n.capacity) for n in sweep.nodes):
        exc = RunnerError(
            f"hydra.launcher.resources: {resources.describe()} fits no node of the cluster"
        )
        return _failed(job, exc)
    tenant = object()
    (ticket,) = sweep.scheduler.submit(Request(resources, 0.0), (job.name,), None, tenant)
    while not sweep.scheduler.admit(tenant):
        if sweep.stop.is_set():
            sweep.scheduler.withdraw(ticket)
            return _failed(job, KeyboardInterrupt())
        time.sleep(POLL / 4)
    grant = ticket.grant
    assert grant is not None
    try:
        strategy = NodeAffinitySchedulingStrategy(sweep.nodes[grant.node].node_id, soft=False)
        ref = (
            _remote()
            .options(
                **resources.ray_options(),
                max_retries=0,
                name=f"hydra job {job.name}",
                scheduling_strategy=strategy,
            )
            .remote(job.config, *carried)
        )
        while not ray.wait([ref], timeout=POLL)[0]:
            if sweep.stop.is_set():
                ray.cancel(ref)  # KeyboardInterrupt in the task: its grace
                if not ray.wait([ref], timeout=GRACE)[0]:
                    ray.cancel(ref, force=True)
                return _failed(job, KeyboardInterrupt())
        try:
            ret = ray.get(ref)
        except Exception as exc:  # its worker died (a crash, out of memory, a node lost)
            return _failed(job, exc)
        assert isinstance(ret, JobReturn)
        return ret
    finally:
        sweep.scheduler.release(grant)


@functools.cache
def _remote() -> RemoteRun:
    """`app_job.run` as a Ray remote function, made once, on first use."""
    import ray

    return ray.remote(app_job.run)


def _failed(job: Job, exc: BaseException) -> JobReturn:
    """A job that ended outside Hydra's `run_job` (never started, stopped, its worker died)."""
    ret = _record(job)
    ret.status, ret.return_value = JobStatus.FAILED, exc
    return ret


def _record(job: Job) -> JobReturn:
    """Hydra's record of a job: its overrides, its config without `hydra`, its directory."""
    HydraConfig.instance().set_config(job.config)
    task_cfg = copy.deepcopy(job.config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    ret = JobReturn(overrides=list(job.overrides), cfg=task_cfg, hydra_cfg=job.config)
    ret.working_dir = os.getcwd()
    return ret


def _kept(kept: Path, job: Job) -> JobReturn | None:
    """The return value a finished job left in the sweep directory, as its JobReturn."""
    try:
        stored = pickle.loads((kept / f"{job.key}.pkl").read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
        return None
    ret = _record(job)
    ret.status, ret.return_value = JobStatus.COMPLETED, stored
    return ret


def _keep(kept: Path, job: Job) -> None:
    """Keep a finished job's return value (written whole, then renamed: never half)."""
    assert job.ret is not None
    try:
        data = pickle.dumps(job.ret.return_value)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        log.warning(
            "%s: its return value cannot be kept (%s); a rerun runs it again", job.name, exc
        )
        return
    kept.mkdir(parents=True, exist_ok=True)
    tmp = kept / f".{job.key}.tmp"
    tmp.write_bytes(data)
    tmp.replace(kept / f"{job.key}.pkl")
