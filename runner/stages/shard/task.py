"""What runs inside a shard's Ray task, on the node that owns its GPUs: check their free
memory, then run the command (in its own process group, killed with the task) or the
function, writing the temporary output and the shard's log."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NotRequired, TextIO, TypedDict

from runner import gpus, procs, scratch
from runner.carry import pack, unpack
from runner.placement import StartTo, StartToFields, announce
from runner.stages.shard.merge import read_table, write_table


class ShardJob(TypedDict):
    """What a shard's task is handed (`ShardRun._job`)."""

    label: str
    attempt: int
    # the command's argv, or else the function's spec ({_target_, **kwargs})
    command: list[str] | None
    fn: dict[str, object] | None
    # the command's placeholders (`{input}`, `{output}`, ...; `{gpus}` is added here)
    values: dict[str, str]
    gpus: float
    # the GPUs (NVML indices) the shard must use, over Ray's pick; None: Ray's pick
    gpu_ids: list[int] | None
    min_gpu_memory_gb: float
    cwd: str
    log: str
    pid: str
    # without a shared filesystem: the run directory's root on the runner's node, and the
    # shard's files (under it) that travel with the task
    carry_root: NotRequired[str]
    stage_in: NotRequired[dict[str, bytes]]


class ShardReply(TypedDict):
    """What a shard's task answers (in virtual time, the simulated cluster in its place)."""

    ok: bool
    cuda_visible_devices: str | None
    started: float
    ended: NotRequired[float]
    error: NotRequired[str | None]
    # why it goes back to the queue, no retry spent: its GPUs were short of free memory
    requeue: NotRequired[str]
    worker: NotRequired[str]
    cpu: NotRequired[float]
    # without a shared filesystem: the shard's files, back from its node
    files: NotRequired[dict[str, bytes]]


def run_shard(job: ShardJob, started_to: StartToFields) -> ShardReply:
    """Runs inside a Ray task on the node that owns the shard's GPUs: say where it runs (a
    `Started` sent to `started_to`, a `StartTo`'s fields), check the GPUs' free memory, then
    run the command (or the function) with its output written to the temporary name; return
    what happened."""
    announce(StartTo(**started_to))
    if job.get("carry_root") is None:
        return _run(job)
    # no shared filesystem: the shard's files live in a directory of this node while it runs
    here = Path(tempfile.mkdtemp(prefix="shard-", dir=scratch.folder()))
    try:
        unpack(here, job["stage_in"])
        moved = _moved(job, job["carry_root"], str(here))
        Path(moved["values"]["output_dir"]).mkdir(exist_ok=True)
        reply = _run(moved)
        sliced = Path(moved["values"]["input"])  # its input slice need not travel back
        reply["files"] = pack(here, [p for p in here.iterdir() if p != sliced])
        return reply
    finally:
        shutil.rmtree(here, ignore_errors=True)


def _moved(job: ShardJob, root: str, here: str) -> ShardJob:
    """The job with its paths under `root` moved under `here`."""

    def move(path: str) -> str:
        return here + path[len(root) :] if path.startswith(root) else path

    values = {k: move(v) for k, v in job["values"].items()}
    return {**job, "values": values, "log": move(job["log"]), "pid": move(job["pid"])}


def _run(job: ShardJob) -> ShardReply:
    started = time.time()
    chosen = job.get("gpu_ids")
    if chosen is not None:  # the GPUs the runner chose, by name: over Ray's own pick
        cuda = ",".join(map(str, chosen))
    else:
        cuda = os.environ.get("CUDA_VISIBLE_DEVICES", "") if job["gpus"] > 0 else ""
    reply = ShardReply(
        ok=False,
        error=None,
        cuda_visible_devices=cuda,
        worker=f"{socket.gethostname()}:{os.getpid()}",
        started=started,
    )
    before = os.times()
    with open(job["log"], "a", buffering=1, errors="replace") as logf:
        logf.write(
            f"--- runner: attempt {job['attempt']} of shard {job['label']} "
            f"on {reply['worker']}, CUDA_VISIBLE_DEVICES={cuda!r}\n"
        )
        short = gpus.short_of_memory(cuda, job["min_gpu_memory_gb"]) if cuda else []
        if short:
            # not the shard's fault: the runner puts it back in the queue, no retry spent
            reply["error"] = reply["requeue"] = (
                f"assigned GPU(s) have less than {job['min_gpu_memory_gb']:g} GB free: "
                + ", ".join(g.describe() for g in short)
            )
        else:
            try:
                with _visible(cuda, chosen is not None):
                    reply["error"] = (
                        _run_command(job, cuda, logf) if job["command"] else _run_fn(job, logf)
                    )
            except Exception as exc:  # the shard's own failure: reported, never a crash
                reply["error"] = f"{type(exc).__name__}: {exc}"
        if reply["error"]:
            logf.write(f"--- runner: {reply['error']}\n")
    after = os.times()
    reply["cpu"] = sum(after[:4]) - sum(before[:4])
    reply["ok"] = reply["error"] is None
    reply["ended"] = time.time()
    return reply


@contextmanager
def _visible(cuda: str, by_index: bool) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES (and, for GPUs the runner chose by NVML index, CUDA's PCI bus
    order, which is NVML's) in this process while the shard runs: a function shard sees
    its GPUs; Ray's own values come back after."""
    want = {"CUDA_VISIBLE_DEVICES": cuda}
    if by_index:
        want["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    old = {k: os.environ.get(k) for k in want}
    os.environ.update(want)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run_command(job: ShardJob, cuda: str, logf: TextIO) -> str | None:
    """Run the argv in its own process group; its output goes to the shard's log."""
    import subprocess

    values = {**job["values"], "gpus": cuda}
    argv = [arg.format(**values) for arg in job["command"] or []]
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable  # the interpreter (and environment) running the runner
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": cuda,
        "RUNNER_SHARD_RANGE": job["label"],
        "RUNNER_SHARD_INDEX": str(job["values"]["shard"]),
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        argv,
        cwd=job["cwd"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    pid_file = Path(job["pid"])
    try:
        # recorded for the driver, which kills the group if this task cannot (inside the
        # try: a cancel that lands while it is written still kills the group)
        procs.record_group(pid_file, proc.pid)
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
        code = proc.wait()
    finally:
        # cancelled (KeyboardInterrupt from ray.cancel) or done: leave nothing of the command
        procs.kill_group(proc.pid)
        proc.wait()
        pid_file.unlink(missing_ok=True)
    if code < 0:
        return f"command killed by signal {procs.signal_name(-code)}"
    return f"command exited with code {code}" if code else None


def _die_with_parent() -> None:
    """In the child: receive SIGKILL when the Ray worker that started it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_fn(job: ShardJob, logf: TextIO) -> str | None:
    from hydra.utils import get_method

    spec = dict(job["fn"] or {})
    target = str(spec.pop("_target_"))
    fn = get_method(target)
    frame = read_table(Path(job["values"]["input"]))
    result = fn(frame, **spec)
    write_table(result, Path(job["values"]["output"]))
    logf.write(f"--- runner: {target}: {len(frame)} rows in, {len(result)} out\n")
    return None
