"""Hydra's own job set-up meeting a directory it cannot write: one message, exit 1.

Before runner's code runs, Hydra creates its output directory (`hydra.run.dir`, by default the
run directory; in a sweep, the sweep directory and each job's), opens its log file there and
snapshots the composed config into `.hydra/`. On a read-only or full file system any of these
raises `OSError` outside runner's error handling, and Hydra prints a traceback and exits 1
(which `runner` would report as 2, a bad spec). Here they end as the same message a ledger
write failure gives (`store.storage_error`), with exit 1: the directory, not the spec, is at
fault, and nothing has run, so a rerun once the directory is writable starts from the ledger as
it was.

A task's own exceptions never reach this: Hydra's `run_job` keeps them in its return value.

A single run's config is also checked before any of this (`install(check=...)`): an invalid
command creates no run directory, no `.hydra/` snapshot and no `runner.log`.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from omegaconf import DictConfig, OmegaConf

from runner.errors import StorageError, SweepJobFailed
from runner.store import storage_error

F = TypeVar("F", bound=Callable[..., Any])


class SetupFailed(SystemExit):
    """Hydra could not set up the job's directory; the message is printed already."""


def _output_dir(kwargs: dict[str, Any]) -> str | None:
    """The directory Hydra was setting up: the job's output directory (`run_job`'s config)."""
    config = kwargs.get("config")
    if not isinstance(config, DictConfig):
        return None
    found = OmegaConf.select(config, "hydra.runtime.output_dir", default=None)
    return str(found) if found else None


def reporting(call: F) -> F:
    """`call` (Hydra's `run_job`) with an `OSError` of its own set-up reported as one message
    and exit 1 instead of a traceback."""

    @functools.wraps(call)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except OSError as exc:
            _fail(Path(_output_dir(kwargs) or exc.filename or os.getcwd()), exc)

    return wrapper  # type: ignore[return-value]


def checked(call: F, check: Callable[[DictConfig], None]) -> F:
    """`call` (Hydra's `run_job`) once `check` has accepted its config; `check` raises (a
    SystemExit with the exit code, its message printed) to refuse the job before Hydra sets
    up anything."""

    @functools.wraps(call)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        config = kwargs.get("config")
        if isinstance(config, DictConfig):
            check(config)
        return call(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def make_dir(path: Path) -> None:
    """Create `path` as Hydra would, or end with the one message (a sweep's directory: Hydra's
    sweeper, a plugin loaded afresh, creates it where no wrapper reaches)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(path, exc)


def prepare_sweep(config: DictConfig) -> None:
    """Do what Hydra's sweeper does first, where a failure is still one message: create the
    sweep directory and save `multirun.yaml` in it (the sweeper writes it again)."""
    where = Path(str(config.hydra.sweep.dir))
    make_dir(where)
    try:
        OmegaConf.save(config, where / "multirun.yaml")
    except OSError as exc:
        _fail(where, exc)


def writing(where: Path, write: Callable[[], None]) -> None:
    """`write()`, a file of the sweep's own (its summary), with the one message on failure."""
    try:
        write()
    except OSError as exc:
        _fail(where, exc)


def _fail(where: Path, exc: OSError) -> NoReturn:
    print(f"runner: error: {storage_error(where, exc)}", file=sys.stderr)
    raise SetupFailed(StorageError.exit_code) from None


_installed = False


def install(check: Callable[[DictConfig], None]) -> None:
    """Wrap Hydra's job set-up, once, where Hydra calls it (hydra-core is pinned to 1.3): a
    single run's in `hydra._internal.hydra`, after `check` of its config; a sweep job's in
    `hydra.core.utils`, where the launcher plugin, which Hydra's plugin scan executes afresh,
    imports it from each time (a sweep job is checked by its task, inside its own directory).
    The sweep's own directory is made by `prepare_sweep` from the sweep callback before any
    job."""
    global _installed
    if _installed:
        return
    _installed = True
    from hydra._internal import hydra as hydra_run
    from hydra._internal import utils as hydra_utils
    from hydra.core import utils

    hydra_run.run_job = checked(reporting(hydra_run.run_job), check)  # type: ignore[attr-defined]
    utils.run_job = reporting(utils.run_job)
    hydra_utils.run_and_report = failed_jobs_in_one_line(hydra_utils.run_and_report)


def failed_jobs_in_one_line(run_and_report: F) -> F:
    """Hydra's `run_and_report` (the command's outermost call), where a sweep's failed
    pipeline job, raised by the sweeper once its batch has ended, is one line and its exit
    code, not Hydra's report of an exception."""

    @functools.wraps(run_and_report)
    def wrapper(func: Callable[[], Any]) -> Any:
        def guarded() -> Any:
            try:
                return func()
            except SweepJobFailed as exc:
                print(f"runner: error: {exc}", file=sys.stderr)
                raise SystemExit(exc.exit_code) from None

        return run_and_report(guarded)

    return wrapper  # type: ignore[return-value]
