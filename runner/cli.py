"""The `runner` command: Hydra composes the spec, then validate → plan → run (or the modes
plan, status, report and cancel).

Errors a user can cause end as one message and exit code 2 (a bad spec, a plan that cannot
fit, a run directory in use); `RUNNER_FULL_ERROR=1` adds the traceback.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import dataclasses
import gc
import importlib.metadata
import importlib.util
import logging
import os
import signal
import sys
import threading
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from runner import (
    DIST,
    __version__,
    cancel,
    completion,
    compose,
    errors,
    history,
    hydra_job,
    procs,
    report,
    sim,
    snapshot,
    sweep,
)
from runner import cluster as clusters
from runner.errors import Interrupted, RunnerError
from runner.execute import Executed, Sharing, execute, stop_on_signals
from runner.plan import Plan, StagePlanner, launches_nothing, make_plan
from runner.resources import Resources
from runner.scheduler import metrics
from runner.schema import Mode
from runner.spec import READING, Origins, Spec, load
from runner.stages.registry import KINDS
from runner.store import RAY_PIDS, SUMMARY, Ledger, RunStore, read_ledger, write_json

log = logging.getLogger("runner")

# the primary config and the example pipelines ship inside the package, found through Hydra's
# `pkg://` search path, so an installed wheel works from any directory
PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"
SPECS_DIR = PACKAGE_DIR / "specs"

# exit codes of the jobs of this invocation (one, or one per multirun job)
_codes: list[int] = []


def note_exit(code: int) -> None:
    """A job of this invocation ended with `code` (the command exits with the highest)."""
    _codes.append(code)


def _task(cfg: DictConfig) -> None:
    code = run_task(cfg)
    _codes.append(code)
    if code and HydraConfig.get().mode is not RunMode.MULTIRUN:
        raise SystemExit(code)


def run_task(cfg: DictConfig) -> int:
    """One composed config: validate, then run, plan or report status. Returns the exit code."""
    try:
        spec = _checked.pop() if _checked else load_spec(cfg)
        code = dispatch(spec)
        sys.stdout.flush()  # here, so a closed pipe is met inside this `try`
        return code
    except BrokenPipeError:
        # `runner mode=plan | head -1`: the reader has all it wanted; no traceback
        _quiet_stdout()
        return 128 + signal.SIGPIPE
    except RunnerError as exc:
        return errors.report(exc)


def load_spec(cfg: DictConfig) -> Spec:
    """A composed config validated (a sweep's job too: Hydra's config of the job set first)."""
    return load(cfg, KINDS, _origins())


# the spec of a single run, validated before Hydra set up its directory (see `_check_first`)
_checked: list[Spec] = []


def _check_first(config: DictConfig) -> None:
    """Validate a single run's spec before Hydra creates its output directory, snapshot and
    log file: an invalid command exits 2 and leaves nothing behind (no `runs/NAME/.hydra/`,
    no `runner.log`). The task then uses the spec validated here."""
    _checked.clear()
    HydraConfig.instance().set_config(config)  # the origins and `run.dir` read it
    cfg = copy.deepcopy(config)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    try:
        _checked.append(load_spec(cfg))
    except RunnerError as exc:
        raise SystemExit(errors.report(exc)) from None


def dispatch(spec: Spec) -> int:
    """Carry out a validated spec's mode; its exit code."""
    if spec.mode is Mode.plan:
        return _plan_only(spec)
    if spec.mode in READING:  # the run directory alone: its ledger and saved config
        return _read(spec, Path(spec.run.dir))
    return _run(spec)


def _read(spec: Spec, run_dir: Path) -> int:
    """status, report or cancel of the run in `run_dir`, named by the pipeline its last
    attempt ran (from its saved config), whatever this command's pipeline and overrides."""
    last = snapshot.latest(run_dir)
    name = last.pipeline if last is not None else spec.pipeline.name
    if spec.mode is Mode.cancel:
        return cancel.cancel(run_dir, spec.units, name)
    if spec.mode is Mode.report:
        return _report(run_dir, name)
    return _status(run_dir, name, last)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _plan_only(spec: Spec) -> int:
    run_dir = Path(spec.run.dir)
    ledger = read_ledger(run_dir)
    info = clusters.describe(spec.cluster)
    plan = make_plan(spec.pipeline, _planners(), info, ledger, spec.run.fresh, run_dir)
    print(report.format_plan(plan))
    return 0


def _status(run_dir: Path, name: str, last: snapshot.Snapshot | None) -> int:
    ledger = read_ledger(run_dir)
    if ledger is None:
        print(f"{run_dir}: no run yet (run `runner pipeline={name}` first)")
        return 0
    print(report.format_status(ledger, str(run_dir), KINDS))
    if last is not None:
        print(f"pipeline {name}; the last attempt's config: {last.path}")
    return 0


def _report(run_dir: Path, name: str) -> int:
    """Redraw the last run's timeline, trace and report.html from its ledger, and write its
    `summary.json` naming them, as the run's end does (a runner killed between the ledger's
    record of its end and its report left none)."""
    ledger = read_ledger(run_dir)
    written = report.write_run_artifacts(ledger, f"{name} {run_dir}", run_dir) if ledger else {}
    if ledger is None or not any(written.values()):
        print(f"{run_dir}: no run to draw yet (run `runner pipeline={name}` first)")
        return 0
    summary = history.whole_run(ledger)
    summary.update(written)
    write_json(run_dir / SUMMARY, summary)
    for path in [*written.values(), str(run_dir / SUMMARY)]:
        if path:
            print(f"wrote {path}")
    return 0


def _simulate(spec: Spec) -> int:
    """cluster=sim: the plan through the scheduler in virtual time; nothing starts."""
    summary = sim.simulate(spec, KINDS, clusters.describe_sim(spec.cluster))
    print(sim.format_report(summary))
    return 0 if summary["ok"] else 1


def _run(spec: Spec) -> int:
    if spec.cluster.kind == "sim":
        return _simulate(spec)
    return run_spec(spec)[0]


def run_spec(spec: Spec, sharing: Sharing | None = None) -> tuple[int, dict[str, Any]]:
    """Run a validated spec on Ray (the embedded one, or the one this process is connected to:
    a sweep's, `runner.launcher`, with its `sharing`); the exit code and the run's summary."""
    store = RunStore(Path(spec.run.dir))
    ledger = store.open()
    try:
        with cf.ThreadPoolExecutor(1, thread_name_prefix="runner-report") as drawing:
            code, summary = _run_on_ray(spec, sharing, store, ledger, drawing)
        print(report.format_summary(summary, str(store.root)))
        return code, summary
    finally:
        store.close()


def _run_on_ray(
    spec: Spec,
    sharing: Sharing | None,
    store: RunStore,
    ledger: Ledger,
    drawing: cf.ThreadPoolExecutor,
) -> tuple[int, dict[str, Any]]:
    """The run on Ray; its report is drawn on `drawing` while the embedded Ray shuts down
    (Ray's goodbye waits a second on its raylet, about what a big run's picture takes)."""
    procs.reap_recorded(store.root / RAY_PIDS)
    # signals are the run's from here: one while Ray starts stops the run once it runs
    stop = threading.Event() if sharing is None else sharing.stop
    signals: AbstractContextManager[list[int]] = (
        stop_on_signals(stop) if sharing is None else nullcontext(sharing.caught)
    )
    with signals as caught:
        return _plan_and_run(spec, sharing, store, ledger, drawing, stop, caught)


def _plan_and_run(
    spec: Spec,
    sharing: Sharing | None,
    store: RunStore,
    ledger: Ledger,
    drawing: cf.ThreadPoolExecutor,
    stop: threading.Event,
    caught: list[int],
) -> tuple[int, dict[str, Any]]:
    plan: Plan | None = None
    if spec.cluster.kind == "local" and not clusters.ray_running_here():
        # plan before Ray starts: a plan that cannot fit fails in a second, not after init
        plan = make_plan(
            spec.pipeline,
            _planners(),
            clusters.describe_local(spec.cluster),
            ledger,
            spec.run.fresh,
            store.root,
        )
    if caught:  # while planning: Ray is not started for a run that is to stop
        raise Interrupted(caught[0], "before any unit started")
    if plan is not None and launches_nothing(plan):
        # every unit done last time: the rerun is answered from the ledger, no Ray started
        return _execute(spec, plan, plan.cluster, sharing, store, ledger, stop, caught).finish()
    with clusters.connected(spec.cluster, store.root / RAY_PIDS, caught) as info:
        if plan is None:
            plan = make_plan(spec.pipeline, _planners(), info, ledger, spec.run.fresh, store.root)
        executed = _execute(spec, plan, info, sharing, store, ledger, stop, caught)
        if executed.caught is not None:  # raised in here: Ray may be half-stopped by the signal
            return executed.finish()
        finished = drawing.submit(executed.finish)
    return finished.result()


def _execute(
    spec: Spec,
    plan: Plan,
    info: clusters.ClusterInfo,
    sharing: Sharing | None,
    store: RunStore,
    ledger: Ledger,
    stop: threading.Event,
    caught: list[int],
) -> Executed:
    """The plan run on `info`'s nodes (the live ones, with the ids placements name), serving
    its metrics meanwhile."""
    plan.cluster = dataclasses.replace(info, shared_fs=spec.cluster.shares_fs)
    _announce(plan)
    if spec.run.fresh:
        # an interrupted fresh run must not be completed later with older results
        ledger.supersede(plan.stages)
    if metrics.REGISTRY.ray is None and clusters.ray_running_here():
        metrics.REGISTRY.export_to_ray()  # Ray's metrics agent exports them where it runs
    if sharing is None:
        metrics.REGISTRY.set_resources(Resources(), plan.cluster.total)
    port = spec.cluster.metrics_port if sharing is None else None  # the sweep's
    with metrics.serving(port):
        return execute(
            plan,
            spec.pipeline,
            KINDS,
            store,
            ledger,
            spec.run.progress,
            spec.run.fresh,
            stop,
            caught,
            sharing,
        )


def is_pipeline(task: object) -> bool:
    """Whether a sweep's task function is the `runner` command's own (its jobs are pipelines,
    run side by side in this process by `runner.launcher`), not another Hydra app's."""
    return task is _task


def _announce(plan: Plan) -> None:
    for stage in plan.stages.values():
        if stage.units is None:
            log.info("%s: %s", stage.name, stage.pending_reason)
            continue
        skipped = len(stage.units) - len(stage.to_run)
        log.info("%s: %d unit(s) to run, %d skipped (done)", stage.name, len(stage.to_run), skipped)


def _planners() -> dict[str, StagePlanner]:
    return {k: v.plan for k, v in KINDS.items()}


def _origins() -> Origins | None:
    """Where each key came from, from Hydra's record of the composition: the file (and the
    search-path root it lies in) or the command-line override that set it."""
    try:
        hc = HydraConfig.get()
    except ValueError:
        return None
    roots = [d for s in hc.runtime.config_sources if (d := source_dir(s.schema, s.path))]
    files: dict[str, Path] = {"": CONF_DIR / "config.yaml"}
    for key, choice in hc.runtime.choices.items():
        if key.startswith("hydra/") or choice is None:
            continue
        group, _, package = key.partition("@")
        for root in roots:
            path = root / group / f"{choice}.yaml"
            if path.is_file():
                files[package or group.replace("/", ".")] = path
                break
    overrides = []
    task_overrides = OmegaConf.to_container(hc.overrides.task, resolve=False)
    assert isinstance(task_overrides, list)
    for text in map(str, task_overrides):  # unresolved: an override may be `KEY=${bad}`
        key = text.split("=", 1)[0].lstrip("+~")
        if key not in hc.runtime.choices:  # `pipeline=NAME` picks a file; it sets no key
            overrides.append((key, text))
    return Origins(files, overrides, roots)


def source_dir(schema: str, path: str) -> Path | None:
    """The directory of a Hydra config source (`file` or `pkg`), or None for the others."""
    if schema == "file":
        return Path(path).resolve()
    if schema == "pkg":
        spec = importlib.util.find_spec(path.replace("/", "."))
        if spec is not None and spec.submodule_search_locations:
            return Path(next(iter(spec.submodule_search_locations))).resolve()
    return None


def _pipelines() -> str:
    """Every pipeline on the search path (the shipped ones and --config-dir's), for --help."""
    try:
        from hydra.core.global_hydra import GlobalHydra

        loader = GlobalHydra.instance().config_loader()
        names = loader.get_group_options("pipeline", config_name="config")
    except Exception:  # not initialized (outside Hydra): the shipped pipelines
        names = [p.stem for p in (SPECS_DIR / "pipeline").glob("*.yaml")]
    return ", ".join(sorted(names))


OmegaConf.register_new_resolver("runner_run_dir", sweep.run_dir, replace=True)
OmegaConf.register_new_resolver("runner_output_dir", sweep.output_dir, replace=True)
OmegaConf.register_new_resolver("runner_snapshot_dir", sweep.snapshot_dir, replace=True)
OmegaConf.register_new_resolver("runner_pipelines", _pipelines, replace=True)
compose.install(KINDS)
completion.install(KINDS)
hydra_job.install(_check_first)
_hydra_main = hydra.main(config_path="pkg://runner.conf", config_name="config", version_base="1.3")(
    _task
)


def _ray_version() -> str:
    try:
        return importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _missing_config_dir(args: list[str]) -> str | None:
    """The `--config-dir` (`-cd`) given on the command line when it is not a directory."""
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag not in ("--config-dir", "-cd"):
            continue
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        if value and not os.path.isdir(value):
            return value
    return None


def command() -> int:
    """The `runner` command (`python -m runner` too): `main`, then the process ends with its
    exit code even when the embedded Ray died under the run (see `cluster.end_process`).

    What the command imported (Ray, Hydra, the runner: most of the process's objects) lives as
    long as the process, so it is frozen out of the cyclic collector first: each full
    collection during the run would walk it again (a third of the garbage collector's time in
    a short run: about 0.05 s of a one-item pipeline's start-up)."""
    gc.freeze()
    try:
        code = main()
    except KeyboardInterrupt:  # a second Ctrl-C while the run was ending
        code = 130
    except BrokenPipeError:  # `runner --help | head`: the reader has all it wanted
        _quiet_stdout()
        code = 128 + signal.SIGPIPE
    # the process ends now: the interpreter's last collection would walk whatever the run
    # left in cycles (a simulated run of 100k units: a million objects, a second), for memory
    # the system takes back anyway; open files are the run's own, closed by then, and the
    # log handlers are flushed at exit as before
    gc.freeze()
    return clusters.end_process(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `runner` and `python -m runner`; returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    blank = sweep.blank_run_dir(args)
    if blank is not None:  # checked before Hydra makes it the sweep directory
        print(f"runner: error: invalid spec: {blank}", file=sys.stderr)
        return 2
    sys.argv = [sys.argv[0], *sweep.sweep_args(args)]
    if "--version" in sys.argv[1:]:  # Hydra's own flag would print Hydra's version
        print(f"runner {__version__} ({DIST}; Hydra {hydra.__version__}, Ray {_ray_version()})")
        return 0
    # worker targets in the user's project import as they would with `python -m`
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    _codes.clear()
    _checked.clear()
    missing = _missing_config_dir(sys.argv[1:])
    if missing is not None:  # Hydra's own message ends in a hint at its traceback
        print(f"runner: error: --config-dir {missing}: no such directory", file=sys.stderr)
        return 2
    try:
        _hydra_main()
    except hydra_job.SetupFailed as exc:  # its message is out already
        return int(exc.code or 1)
    except SystemExit as exc:
        if isinstance(exc.code, int) and exc.code:
            if _codes:  # a sweep: the highest exit code of its jobs
                return max([*_codes, exc.code])
            # Hydra exits 1 on a composition error (unknown pipeline, bad override): a usage
            # error, so exit 2 as for any other bad spec
            return 2 if exc.code == 1 else exc.code
        return 0 if exc.code is None or exc.code == 0 else 1
    return max(_codes, default=0)
