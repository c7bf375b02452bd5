"""Developer sessions: `nox -l` lists them, `nox -s NAME` runs one."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "venv"
PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite on a real local Ray."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff: lint and formatting; radon: no function in runner/ above cyclomatic complexity 20."""
    session.install("ruff", "radon")
    session.run("ruff", "check", "runner", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "runner")
    # rank D and worse is a complexity above 20
    tangled = session.run("radon", "cc", "-s", "-n", "D", "runner", silent=True)
    if isinstance(tangled, str) and tangled.strip():
        session.error(f"functions above cyclomatic complexity 20:\n{tangled}")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the runner package."""
    session.install("-e", ".[dev]")
    session.run("mypy", "runner")


@nox.session(python=PYTHON)
def wheel(session: nox.Session) -> None:
    """The built wheel, installed without -e, runs the demo from a directory outside the clone."""
    tmp = session.create_tmp()
    session.run("pip", "wheel", "--no-deps", "-w", f"{tmp}/dist", ".")
    wheels = sorted(Path(tmp, "dist").glob("ray_stage_runner-*.whl"))
    session.install(str(wheels[-1]))
    with session.chdir(tmp):
        session.run("runner", "--version")
        session.run("runner", "pipeline=demo", f"run.dir={tmp}/run", "run.progress=log")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks against raw Ray and plain Python, saved as JSON for comparison."""
    session.install("-e", ".[test]")
    session.run(
        "pytest",
        "benchmarks",
        "--benchmark-only",
        "--benchmark-autosave",
        "--benchmark-columns=min,median,mean,rounds",
        "-p",
        "no:cacheprovider",
        *session.posargs,
    )
