"""What runs inside a job's Ray task: the job in the worker's jobs group, guarded by a watcher,
stopped at its time limit, over its memory, on cancel, and when the Ray worker dies.

Memory is a limit, enforced by a watchdog over the job's whole process tree (children
included, resident memory summed) every `MEMORY_POLL` seconds: a job over its `memory` is
SIGKILLed whole and recorded OUT_OF_MEMORY, as Slurm's cgroup would. A cgroup v2 limit would
need a delegated cgroup the runner may write, which Ray's workers do not have."""

from __future__ import annotations

import contextlib
import math
import os
import resource as rusage
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypedDict

from runner.carry import Dest, DestFields, collect, discard
from runner.placement import Announcement, StartToFields
from runner.procs import kill_group, signal_name, tree_rss
from runner.resources import gib


class JobTask(TypedDict):
    """What a job's task needs to start it (`Job.task_spec`)."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    time_limit: float | None
    # bytes its whole process tree may hold (0: no limit)
    memory: int


class JobRun(JobTask):
    """`run_job`'s argument: the job, its stage's `cancel_grace`, where its streams go."""

    grace: float
    stdout: DestFields
    stderr: DestFields


# seconds between SIGTERM and SIGKILL when a job's process group is stopped
KILL_GRACE = 3.0
# seconds between two looks at a job's memory, when it has a limit
MEMORY_POLL = 0.1
# how the memory limit is enforced, as the job's result says
MEMORY_ENFORCER = "watchdog"

# A Ray worker runs one task at a time, so its jobs take turns in one process group, made once
# per worker, not once per job (a process per job was a fifth of a trivial job's cost):
# - its leader, the anchor, is a child that exited at once and is never waited for: a zombie
#   that holds the group's id for as long as the worker lives (no later process can get it),
#   while ending the group (`killpg`) after each job leaves the anchor, and the group, as is;
# - the watcher, in a group of its own (the jobs' kills miss it), reads a pipe from the worker:
#   when the worker dies (crash, OOM kill, its driver SIGKILLed) it reads EOF and kills the
#   jobs' group. It ignores SIGTERM, so it still guards the group during a kill grace. It is
#   not the worker's child but its shell's background child, left to init: a Ray worker that
#   exits kills its direct children first (`RAY_kill_child_processes_on_worker_exit`, on by
#   default), which would end a child watcher before the EOF it waits for, and a job's own
#   children (not the worker's direct ones) would outlive it.
# Both exist before a job starts in the group: no window in which a job runs unguarded.
# POSIX `sh`: where that is dash it starts in a fifth of bash's time. The pipe comes in as the
# shell's stdin, kept as descriptor 3 (a background list's stdin is /dev/null; dash takes no
# descriptor above 9 in a redirection).
_WATCHER = (
    "trap '' TERM INT HUP; exec 3<&0; (read -r _ <&3; kill -KILL -$1) >/dev/null 2>&1 & echo $!"
)
_SHELL = "sh"


def run_job(spec: JobRun, started_to: StartToFields) -> dict[str, object]:
    """Run one job to its end in the worker's jobs group and return what happened, as the
    ledger keeps it (with its logs, where they are carried back through Ray). Where it runs (a
    `Started` for `started_to`, a `StartTo`'s fields) is said once it has run a moment, or in
    its reply if it ends sooner (`Announcement`).

    `spec` is the job's `Job.task_spec()` with its `grace` and where its streams go (`stdout`,
    `stderr`: a `Dest`'s fields): plain data, which Ray passes at a fraction of the cost of our
    own classes (`remote.plain`).

    A cancel from the runner arrives as KeyboardInterrupt; the group is stopped either way."""
    out, err = Dest(**spec["stdout"]), Dest(**spec["stderr"])
    start = Announcement(started_to)
    node = start.where.host
    started = start.where.time
    cpu_before = _children_cpu()
    proc: subprocess.Popen[bytes] | None = None
    stop = Stop()
    with GROUP.turn() as group:
        try:
            try:
                proc = _start(spec, out.here(), err.here(), group)
            except OSError as exc:
                error = f"cannot start: {exc}"
                reply = {"state": "failed", "error": error, "node": node, "started": started}
                return start.reply({**reply, "files": collect([out, err])})
            stop = _wait(proc, spec["time_limit"], spec.get("memory") or 0, start)
            if stop.reason == "out_of_memory":  # as the kernel's OOM killer would: no grace
                kill_group(group, signal.SIGKILL)
        except BaseException:  # cancelled: no reply to carry its logs back in
            discard([out, err])
            raise
        finally:  # a cancel (KeyboardInterrupt) gets the stage's cancel_grace
            grace = KILL_GRACE if stop.reason else spec.get("grace", KILL_GRACE)
            _stop_group(group, proc, grace)
    assert proc is not None
    reply = _outcome(proc, stop, node, started, _children_cpu() - cpu_before, spec)
    if reply["state"] == "failed" and (said := _last_line(err.here())):
        reply["error"] = f"{reply['error']}: {said}"  # 'exit code 127' says less than its why
    return start.reply({**reply, "files": collect([out, err])})


# how much of a failed job's stderr is read for its last line, and how much of that line is kept
TAIL_BYTES, LINE_CHARS = 4096, 200


def _last_line(path: str) -> str | None:
    """The last line a job wrote to its stderr (`sh: 1: nosuchcmd: not found`), from the file's
    tail, cut to LINE_CHARS; None when it wrote none."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - TAIL_BYTES))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:LINE_CHARS] if lines else None


class Watcher:
    """A jobs group's watcher (see `_WATCHER`): its pid and the pipe's end this worker holds."""

    def __init__(self, anchor: int) -> None:
        read, self.pipe = os.pipe()
        try:
            started = subprocess.run(
                [_SHELL, "-c", _WATCHER, _SHELL, str(anchor)],
                stdin=read,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                process_group=0,
                check=True,
            )
            self.pid = int(started.stdout)
        except BaseException:
            os.close(self.pipe)
            raise
        finally:
            os.close(read)

    def alive(self) -> bool:
        """Whether the watcher still reads the pipe (it is its only reader: once it is gone the
        pipe's end here reports an error)."""
        poll = select.poll()
        poll.register(self.pipe, select.POLLOUT)
        return not any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0))

    def end(self, kill: bool) -> None:
        """Let the watcher go: SIGKILLed first when `kill` (it ignores SIGTERM), else it reads
        EOF and ends the group as it would at the worker's death."""
        if kill and self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        os.close(self.pipe)


class JobsGroup:
    """The process group this Ray worker's jobs run in, and its watcher (see `_WATCHER`)."""

    def __init__(self) -> None:
        self.anchor: subprocess.Popen[bytes] | None = None
        self.watcher: Watcher | None = None
        self.busy = False

    @contextlib.contextmanager
    def turn(self) -> Iterator[int]:
        """The group, for one job to have to itself until it ends: a second job at once in
        this process (never, with Ray's one task at a time per worker) would have its
        processes killed at the first one's end, so it is refused."""
        if self.busy:
            raise RuntimeError("another job is running in this Ray worker's jobs group")
        self.busy = True
        try:
            yield self.ready()
        finally:
            self.busy = False

    def ready(self) -> int:
        """The group's id, once its anchor holds it and its watcher runs (made anew when
        either is gone: two cheap checks per job)."""
        if self.anchor is None or not _zombie_child(self.anchor.pid):
            # the old group's id may be anyone's now: its watcher goes without killing it
            self._drop_watcher(kill=True)
            self.anchor = subprocess.Popen(
                [_SHELL, "-c", ":"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                process_group=0,  # the leader of a group of its own: the jobs' group
            )
            os.waitid(os.P_PID, self.anchor.pid, os.WEXITED | os.WNOWAIT)  # a zombie now
        if self.watcher is None or not self.watcher.alive():
            self._drop_watcher(kill=False)
            self.watcher = Watcher(self.anchor.pid)
        return self.anchor.pid

    def _drop_watcher(self, kill: bool) -> None:
        if self.watcher is not None:
            self.watcher.end(kill)
            self.watcher = None


def _zombie_child(pid: int) -> bool:
    """Whether `pid` is still this process's exited, unwaited child (looked at, not reaped)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # waited for by someone else: its id is free again
        return False


# this worker's (made at its first job)
GROUP = JobsGroup()


def _start(spec: JobTask, out: str, err: str, group: int) -> subprocess.Popen[bytes]:
    env = _worker_env()
    env.update((os.fsencode(k), os.fsencode(v)) for k, v in spec["env"].items())
    stdout = os.open(out, _LOG_FILE, 0o644)
    try:
        stderr = os.open(err, _LOG_FILE, 0o644)
        try:
            return subprocess.Popen(
                spec["argv"],
                cwd=spec["cwd"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                process_group=group,
            )
        finally:
            os.close(stderr)
    finally:
        os.close(stdout)


# how a job's log file is opened: the job gets it as its stdout or stderr, the worker keeps none
_LOG_FILE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC


def _worker_env() -> dict[bytes, bytes]:
    """A copy of this worker's environment as it is now (Ray sets a task's visible devices
    in it), as bytes: the dict under `os.environb` where CPython has one, copied whole at C
    speed, where `os.environb.copy()` takes each variable through `_Environ`'s Python
    methods (a tenth of a trivial job's CPU time in its task) and `os.environ` would decode
    each one that Popen encodes back."""
    data = getattr(os.environb, "_data", None)
    return dict(data) if isinstance(data, dict) else os.environb.copy()


@dataclass
class Stop:
    """Why the runner ended a job (reason None: it exited by itself), and its peak memory."""

    reason: str | None = None
    rss: int = 0


def _wait(
    proc: subprocess.Popen[bytes], limit: float | None, memory: int, start: Announcement
) -> Stop:
    """Wait for the job's own process to exit, or its time limit, or its tree over `memory`
    bytes (0: no memory limit); say where it runs once it is due (`start`).

    The exit is seen the moment it happens through a pidfd (Linux), where Popen.wait(timeout)
    would sleep-poll in steps growing to 50 ms; the short bound keeps Ray's cancellation able
    to interrupt the wait."""
    stop = Stop()
    poll = MEMORY_POLL if memory else 0.5
    exits = _pidfd(proc.pid)
    try:
        while True:
            left = None if limit is None else limit - (time.time() - start.where.time)
            if left is not None and left <= 0:
                stop.reason = "timeout"
                return stop
            if memory:
                stop.rss = max(stop.rss, tree_rss(proc.pid))
                if stop.rss > memory:
                    stop.reason = "out_of_memory"
                    return stop
            timeout = min(poll, start.say_if_due(), math.inf if left is None else left)
            if exits is not None:
                select.select([exits], [], [], timeout)  # readable once the process exited
                if proc.poll() is not None:
                    return stop
                continue
            try:
                proc.wait(timeout=timeout)
                return stop
            except subprocess.TimeoutExpired:
                continue
    finally:
        if exits is not None:
            os.close(exits)


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when `pid` exits (None where the OS has none)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _stop_group(group: int, proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    """SIGTERM a job still running and give it `grace` seconds to end, then SIGKILL its whole
    group (also after a normal exit: nothing a job started outlives it)."""
    if proc is not None and proc.poll() is None:
        kill_group(group, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    kill_group(group, signal.SIGKILL)
    if proc is not None:
        if proc.poll() is None:  # it left the group (setsid): it is still the job's to end
            proc.kill()
        proc.wait()


def _outcome(
    proc: subprocess.Popen[bytes],
    stop: Stop,
    node: str,
    started: float,
    cpu: float,
    spec: JobTask,
) -> dict[str, object]:
    code = proc.returncode
    sig = signal_name(-code) if code < 0 else None
    memory = spec.get("memory") or 0
    if stop.reason == "timeout":
        state, error = "timeout", f"time_limit {spec['time_limit']:g}s exceeded"
    elif stop.reason == "out_of_memory":
        state = "out_of_memory"
        error = (
            f"memory {gib(memory)} exceeded: its processes held {gib(stop.rss)} ({MEMORY_ENFORCER})"
        )
    elif code == 0:
        state, error = "done", None
    else:
        state, error = "failed", f"killed by {sig}" if sig else f"exit code {code}"
    return {
        "state": state,
        "error": error,
        "node": node,
        "started": started,
        "ended": time.time(),
        "exit_code": code if code >= 0 else None,
        "signal": sig,
        "pid": proc.pid,
        "cpu": cpu,
        **({"memory_limit": MEMORY_ENFORCER, "peak_rss": stop.rss} if memory else {}),
    }


def _children_cpu() -> float:
    usage = rusage.getrusage(rusage.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
