"""The exceptions a user can meet, each mapped to the exit code the contract gives it, and
the one line that reports one (`report`)."""

from __future__ import annotations

import os
import sys
import traceback


class RunnerError(Exception):
    """Root of every error that is reported as one plain message, never a traceback."""

    exit_code = 1


class SpecError(RunnerError):
    """The spec is invalid: every problem is listed, and nothing has started."""

    exit_code = 2

    def __init__(self, problems: list[str], header: str = "invalid spec") -> None:
        self.problems = problems
        lines = [f"{header} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


class PlanError(SpecError):
    """The spec is valid but its plan cannot run on this cluster (it can never fit)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems, header="plan cannot run on this cluster")


class InputError(SpecError):
    """An input file the spec names cannot be used (unreadable, empty, bad ids); found while
    planning, before anything runs."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems, header="invalid input")


class RunLockedError(RunnerError):
    """Another runner holds the run directory."""

    exit_code = 2


class ClusterError(RunnerError):
    """Ray could not be started or reached."""

    exit_code = 2


class ClusterLost(ClusterError):
    """The Ray cluster went away under the run (stopped, its head node down): the run stops,
    and the ledger keeps every unit it had committed, so a rerun resumes once it is back."""

    exit_code = 1

    def __init__(self, address: str, why: str, sweep: bool = False) -> None:
        self.address, self.why = address, why
        after = (
            "the sweep stopped, each job's ledger keeps what finished: run the sweep again to "
            "resume"
            if sweep
            else "the run stopped, the ledger keeps what finished: run again to resume"
        )
        super().__init__(f"lost the Ray cluster at {address}: {why} (was it stopped?); {after}")

    def of_sweep(self) -> ClusterLost:
        """The same loss said once for a sweep, whose jobs all ran on that cluster."""
        return ClusterLost(self.address, self.why, sweep=True)


class StorageError(RunnerError):
    """The run directory cannot be written (read-only, full disk): the run stops, and the
    ledger keeps every unit it had committed, so a rerun resumes once the cause is fixed."""

    exit_code = 1


class Interrupted(RunnerError):
    """The run was stopped by a signal; the exit code follows the shell convention."""

    def __init__(self, signum: int, what: str) -> None:
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by signal {signum}: {what}")


class SweepJobFailed(RunnerError):
    """A sweep's pipeline job ended with a non-zero exit code: its `JobReturn` is FAILED with
    this, which the sweeper raises once the batch has ended (the `runner` command says it in
    one line and exits with the highest code of its jobs)."""

    def __init__(self, job: str, code: int, where: str) -> None:
        self.exit_code = code
        super().__init__(f"sweep job {job} ended with exit {code} ({where})")


def report(exc: RunnerError) -> int:
    """Say what went wrong in one message (the traceback too with RUNNER_FULL_ERROR=1); the
    exit code it maps to."""
    if os.environ.get("RUNNER_FULL_ERROR"):
        traceback.print_exception(exc)
    print(f"runner: error: {exc}", file=sys.stderr)
    return exc.exit_code
