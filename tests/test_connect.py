"""Starting and reaching Ray: cluster=local is always a Ray of its own, cluster=ray gives up
on an unreachable address after `cluster.connect_timeout`, joins a stock `ray start --head`
with token authentication on using the token as Ray's CLI finds it (or says at once what to
do), and an optional part of Ray that is missing is named with the extra that brings it."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest

from runner import cluster as clusters
from runner import procs
from runner.lifecycle import UnitState
from runner.schema import ClusterConfig
from tests.conftest import (
    ROOT,
    TEST_SPECS,
    Result,
    run_runner,
    summary,
    unit_states,
    wait_until,
)


def closed_port() -> int:
    return closed_ports(1)[0]


def closed_ports(n: int) -> list[int]:
    """`n` distinct ports nothing listens on: each socket is held until all are bound (a port
    closed at once may be handed out again by the next bind: `ray start` then refuses two
    components on one port)."""
    with ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def test_an_unreachable_cluster_gives_up_after_connect_timeout(tmp_path: Path) -> None:
    port = closed_port()
    res = run_runner(
        "pipeline=numbers",
        "cluster=ray",
        f"cluster.address=127.0.0.1:{port}",
        "cluster.connect_timeout=1",
        f"run.dir={tmp_path}",
        env={"RAY_ADDRESS": ""},
    )
    assert res.code == 2, res.text
    assert (
        f"runner: error: could not reach Ray at '127.0.0.1:{port}' within 1 s "
        "(cluster.connect_timeout): Connection refused\n" in res.err
    )
    assert "Traceback" not in res.err


def _missing(monkeypatch: pytest.MonkeyPatch, check: str) -> None:
    from ray._private import utils

    monkeypatch.setattr(utils, check, lambda: ImportError("No module named 'grpc'"))


def test_a_ray_client_address_without_the_client_extra_names_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _missing(monkeypatch, "get_ray_client_dependency_error")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = ClusterConfig(kind="ray", address="ray://head:10001")
    with pytest.raises(clusters.ClusterError) as err:
        clusters._init_remote(cfg)
    assert str(err.value) == (
        "a ray:// address (ray://head:10001) needs Ray's optional packages (No module named "
        "'grpc'): pip install 'ray-stage-runner[client]'"
    )


def test_the_dashboard_without_its_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _missing(monkeypatch, "get_dashboard_dependency_error")
    cfg = ClusterConfig(kind="local", dashboard=True, num_cpus=1)
    with pytest.raises(clusters.ClusterError) as err:
        clusters._init_local(cfg, clusters.describe_local(cfg))
    assert str(err.value).endswith("pip install 'ray-stage-runner[dashboard]'")
    assert str(err.value).startswith("the Ray dashboard (cluster.dashboard=true) needs")


def test_cluster_local_starts_its_own_ray_whatever_ray_address_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray's `address="local"` ignores RAY_ADDRESS; the embedded start is asked for exactly
    that (a real second Ray is started by .ci/run's demo run with RAY_ADDRESS set)."""
    import ray

    asked: dict[str, Any] = {}

    def init(**kwargs: Any) -> None:
        asked.update(kwargs)
        raise RuntimeError("not started in this test")

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setattr(ray, "init", init)
    cfg = ClusterConfig(kind="local", num_cpus=1)
    with pytest.raises(clusters.ClusterError, match="could not start a local Ray"):
        clusters._init_local(cfg, clusters.describe_local(cfg))
    assert asked["address"] == "local"
    assert asked["include_dashboard"] is False
    assert asked["logging_level"] == 40  # ERROR: Ray's start-up warnings hidden by default
    # the raylet's connect to its own object store retried every 0.1 s, not every second
    assert asked["_system_config"] == {
        "raylet_client_connect_timeout_milliseconds": 100,
        "raylet_client_num_connect_attempts": 100,
    }


def test_a_users_own_raylet_connect_retry_is_left_to_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """`RAY_raylet_client_num_connect_attempts` (or the timeout) in the user's environment: the
    embedded start sets neither, so Ray reads theirs (a `_system_config` would override it)."""
    monkeypatch.setenv("RAY_raylet_client_num_connect_attempts", "30")
    assert clusters.system_config() == {}


# what tells Ray about tokens and addresses: each test sets its own
RAY_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@dataclass(frozen=True)
class Head:
    """A stock Ray head node: its port, and a home whose ~/.ray/auth_token it found."""

    port: int
    home: Path
    # the `ray start --block` process, above every process of the head node
    pid: int = 0

    def stop(self) -> None:
        """Stop it as `ray stop` does, by the pids of its own processes (other Rays run on this
        machine): its raylet first, then the others, its GCS server last."""
        with suppress(psutil.NoSuchProcess):
            tree = psutil.Process(self.pid).children(recursive=True)
            first = [p for p in tree if p.name() == "raylet"]
            last = [p for p in tree if p.name() == "gcs_server"]
            for bucket in (first, [p for p in tree if p not in first + last], last):
                for p in bucket:
                    with suppress(psutil.NoSuchProcess):
                        p.terminate()
                psutil.wait_procs(bucket, timeout=5)
        procs.kill_tree(self.pid, grace=30)  # `ray start --block`, and whatever is left

    def env(self, home: Path | None = None, **more: str) -> dict[str, str]:
        """An environment as a user's shell on this machine has it (home: where Ray looks for
        ~/.ray/auth_token), without any Ray variable but `more`."""
        clean = {k: v for k, v in os.environ.items() if k not in RAY_ENV}
        return {**clean, "HOME": str(home or self.home), **more}


@pytest.fixture(scope="module")
def stock_head() -> Iterator[Head]:
    """`ray start --head --port=PORT` as a user starts it (`ray_head`), for the module."""
    with ray_head() as head:
        yield head


@contextmanager
def ray_head() -> Iterator[Head]:
    """`ray start --head --port=PORT` as a user starts it, on free ports and a temp dir of its
    own, on a machine where Ray ran before (so ~/.ray/auth_token exists and Ray 2.60 turns
    token authentication on). Its processes are stopped by their pids at the end (never
    `ray stop`: other Rays run on this machine)."""
    home = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    flags = (
        "dashboard-port",
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-grpc-port",
        "dashboard-agent-listen-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    )
    port, *others = closed_ports(1 + len(flags))
    ports = {f"--{flag}={p}" for flag, p in zip(flags, others, strict=True)}
    log = home / "head.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
             "--block", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
             f"--temp-dir={home / 't'}", *sorted(ports)],
            env=Head(port, home).env(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    head = Head(port, home, proc.pid)
    try:
        wait_until(
            lambda: "Ray runtime started" in log.read_text() or proc.poll() is not None,
            timeout=180,
            what="the Ray head to start",
        )
        assert proc.poll() is None, log.read_text()
        assert "Token authentication is enabled" in log.read_text()
        yield head
    finally:
        head.stop()
        proc.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


def runner_with(env: dict[str, str], *args: str) -> Result:
    """`python -m runner ARGS` from the repository root in exactly `env`."""
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "--config-dir", str(TEST_SPECS), "run.progress=log",
         *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return Result(proc.returncode, proc.stdout, proc.stderr)


def test_a_stock_head_with_token_auth_is_joined_with_the_token_ray_finds(
    stock_head: Head, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{stock_head.port}"
    run_dir = tmp_path / "run"
    # the README's command, as written but for the run directory
    res = runner_with(
        stock_head.env(RAY_ADDRESS=address), "pipeline=demo", "cluster=ray", f"run.dir={run_dir}"
    )
    assert res.code == 0, res.text
    assert "InvalidAuthToken" not in res.err
    assert f"Ray at {address} asks for a token: using ~/.ray/auth_token, as Ray's CLI does" in (
        res.err
    )
    assert summary(run_dir)["ok"]
    assert len(pd.read_parquet(run_dir / "total" / "results.parquet")) == 1000


def test_a_stock_head_refuses_a_process_without_its_token_in_one_message(
    stock_head: Head, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{stock_head.port}"
    head = f"runner: error: Ray at {address!r} refused this process: the cluster has token "
    fix = (
        "put the cluster's token (`ray get-auth-token` on its head node prints it) in "
        "RAY_AUTH_TOKEN, in ~/.ray/auth_token, or in a file named by RAY_AUTH_TOKEN_PATH\n"
    )
    args = ("pipeline=numbers", "cluster=ray", f"run.dir={tmp_path / 'run'}")
    elsewhere = tmp_path / "home"  # a machine where Ray never ran: no ~/.ray/auth_token
    elsewhere.mkdir()
    cases = {
        "authentication on and no token was found here: ": stock_head.env(
            elsewhere, RAY_ADDRESS=address
        ),
        "authentication on and does not take the token from RAY_AUTH_TOKEN: ": stock_head.env(
            RAY_ADDRESS=address, RAY_AUTH_TOKEN="0123456789abcdef"
        ),
    }
    for why, env in cases.items():
        res = runner_with(env, *args)
        assert res.code == 2, res.text
        assert res.err == head + why + fix
    disabled = runner_with(stock_head.env(RAY_ADDRESS=address, RAY_AUTH_MODE="disabled"), *args)
    assert disabled.code == 2
    assert disabled.err == (
        f"{head}authentication on, and RAY_AUTH_MODE=disabled sends no token: unset "
        "RAY_AUTH_MODE (or set it to token)\n"
    )


def stopped_mid_run(
    head: Head, proc: subprocess.Popen[str], running: Callable[[], bool], what: str
) -> tuple[str, str]:
    """The cluster stopped (`ray stop`, by its pids) once `running`; what the runner then
    said, on its way out (killed if it does not go within 45 s)."""
    try:
        wait_until(running, timeout=120, what=what)
        head.stop()
        return proc.communicate(timeout=45)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_a_cluster_stopped_mid_run_ends_it_in_one_line_and_a_rerun_resumes(tmp_path: Path) -> None:
    """`ray stop` while jobs run on the cluster: the runner says so in one line and exits 1,
    well before Ray's own minute of reconnecting (which ended the process with exit 1 and a
    line of Ray's, or, by which of Ray's processes went first, failed the jobs or raised a
    traceback); the jobs cut short are not failed, and a rerun runs just them."""
    cwd, run_dir = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    args = ("pipeline=jobs_resume", f"pipeline.stages.work.cwd={cwd}", f"run.dir={run_dir}")
    with ray_head() as head:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "--config-dir", str(TEST_SPECS),
             "run.progress=log", "cluster=ray", *args],
            cwd=ROOT, env=head.env(RAY_ADDRESS=f"127.0.0.1:{head.port}"), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

        def running() -> bool:
            return all((cwd / f"slow[{i}].pid").exists() for i in (1, 2))

        out, err = stopped_mid_run(head, proc, running, "the slow jobs to run")
    assert proc.returncode == 1, out + err
    assert err.splitlines()[-1].startswith("runner: error: lost the Ray cluster at "), err
    assert err.endswith(
        " (was it stopped?); the run stopped, the ledger keeps what finished: run again to resume\n"
    ), err
    assert "Traceback" not in err
    done, cut = UnitState.done, UnitState.cancelled
    assert unit_states(run_dir, "work") == {
        "quick[1]": done, "quick[2]": done, "slow[1]": cut, "slow[2]": cut
    }  # fmt: skip
    plan = run_runner(*args, "mode=plan", "cluster=local")
    assert plan.code == 0, plan.text
    assert "not finished last time   [slow[1], slow[2]]" in plan.out


def test_a_cluster_stopped_mid_sweep_is_one_line_for_the_sweep(tmp_path: Path) -> None:
    """`ray stop` while two jobs of a sweep run on the cluster and a third waits its turn
    (`max_parallel=2`): the loss is said once, for the sweep, and the waiting job does not
    start (before: each running job said it, without its label, and the waiting one started
    on the lost cluster: 'no live nodes', exit 2); the jobs cut short are not failed, and the
    sweep exits 1."""
    sweep_dir = tmp_path / "sweep"
    for name in "abc":
        (tmp_path / name).mkdir()
    with ray_head() as head:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "-m", "--config-dir", str(TEST_SPECS),
             "run.progress=log", "cluster=ray", "pipeline=jobs_resume",
             "pipeline.stages.work.cpus_per_task=0.5", "pipeline.stages.work.cwd=a,b,c",
             "hydra.launcher.max_parallel=2", f"hydra.sweep.dir={sweep_dir}"],
            cwd=tmp_path, env=head.env(RAY_ADDRESS=f"127.0.0.1:{head.port}"), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

        def running() -> list[str]:
            return [
                n for n in "abc" if all((tmp_path / n / f"slow[{i}].pid").exists() for i in (1, 2))
            ]

        out, err = stopped_mid_run(head, proc, lambda: len(running()) == 2, "two jobs' slow jobs")
    assert proc.returncode == 1, out + err
    assert "Traceback" not in err and "no live nodes" not in err, err
    (lost,) = [line for line in err.splitlines() if "lost the Ray cluster" in line]
    assert lost.startswith("runner: error: lost the Ray cluster at "), err
    assert lost.endswith(
        " (was it stopped?); the sweep stopped, each job's ledger keeps what finished: run the "
        "sweep again to resume"
    ), err
    assert err.splitlines()[-1].endswith(
        "ended with exit 1 (the sweep lost its Ray cluster, as said above)"
    ), err
    jobs = {
        n: sweep_dir
        / f"cluster=ray,pipeline.stages.work.cpus_per_task=0.5,pipeline.stages.work.cwd={n}"
        for n in "abc"
    }
    done, cut = UnitState.done, UnitState.cancelled
    for name in running():
        assert unit_states(jobs[name], "work") == {
            "quick[1]": done, "quick[2]": done, "slow[1]": cut, "slow[2]": cut
        }  # fmt: skip
    (waited,) = set("abc") - set(running())
    assert not (jobs[waited] / "ledger.sqlite").exists()
