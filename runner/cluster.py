"""Describe the cluster, and start or connect to Ray for a run.

Planning must not need Ray for a local cluster (plan mode starts nothing), so a local
cluster is described from its declared (or detected) size; the same numbers are then handed
to `ray.init`, so the plan and Ray agree. A Ray cluster is described from `ray.nodes()`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from runner import DIST, gpus, procs, ray_auth, scratch
from runner.errors import ClusterError, ClusterLost, Interrupted, SpecError
from runner.resources import Resources
from runner.schema import ClusterConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterInfo:
    """The nodes of a cluster and what each can give."""

    nodes: tuple[Resources, ...]
    where: str  # a few words for the plan header
    # Ray's node ids and IPs, in the order of `nodes` (empty before Ray is up)
    node_ids: tuple[str, ...] = ()
    node_ips: tuple[str, ...] = ()
    # the partitions its nodes belong to (`cluster.partitions`, or on a Ray cluster its nodes'
    # labels); None: not known here
    partitions: tuple[str, ...] | None = None
    # on a Ray cluster, each node's partitions, in the order of `nodes` (its Ray node labels,
    # see `partitions_of`); empty where every node has all of `partitions` (embedded, sim)
    node_partitions: tuple[frozenset[str], ...] = ()
    # every node sees the run directory at the same path (`cluster.shared_fs`)
    shared_fs: bool = True
    # a simulated cluster's GPU memory per GPU (GB), in the order of `nodes`, as its
    # `cluster.nodes` declare it (`gpu_memory_gb`; inf where undeclared); empty elsewhere,
    # where a shard's `min_gpu_memory_gb` is checked against what NVML finds
    gpu_memory_gb: tuple[float, ...] = ()

    def gpu_memory_nodes(self, gpus: float, gb: float) -> frozenset[int] | None:
        """The nodes (indices) with `gpus` GPUs of at least `gb` GB each, where the cluster
        declares its GPUs' memory (simulated); None where it does not (any node)."""
        if not self.gpu_memory_gb or gb <= 0:
            return None
        return frozenset(
            i
            for i, (node, mem) in enumerate(zip(self.nodes, self.gpu_memory_gb, strict=True))
            if node.gpus >= gpus and mem >= gb
        )

    @property
    def total(self) -> Resources:
        total = Resources()
        for node in self.nodes:
            total = total + node
        return total

    def ray_nodes(self) -> list[RayNode]:
        """Its nodes as the loop follows them (ids, IPs, capacity, partitions), by index."""
        return [
            RayNode(
                node_id,
                self.node_ips[i],
                self.nodes[i],
                self.node_partitions[i] if self.node_partitions else frozenset(),
            )
            for i, node_id in enumerate(self.node_ids)
        ]

    @property
    def largest(self) -> Resources:
        """The most of each resource any single node has (a unit must fit on one node)."""
        return Resources(
            cpus=max(n.cpus for n in self.nodes),
            gpus=max(n.gpus for n in self.nodes),
            memory=max(n.memory for n in self.nodes),
        )


def describe_local(cfg: ClusterConfig) -> ClusterInfo:
    """The embedded cluster this config would start: declared sizes, else this machine's."""
    cpus = cfg.num_cpus if cfg.num_cpus is not None else float(len(os.sched_getaffinity(0)))
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else len(gpus.inventory())
    memory = cfg.memory_gb * (1 << 30) if cfg.memory_gb else _default_memory()
    node = Resources(cpus=cpus, gpus=float(num_gpus), memory=memory)
    return ClusterInfo((node,), f"local Ray: {node.describe()}", partitions=tuple(cfg.partitions))


@dataclass(frozen=True)
class RayNode:
    """One live node as Ray reports it."""

    node_id: str
    ip: str
    capacity: Resources
    # the partitions it belongs to, by its Ray node labels
    partitions: frozenset[str] = frozenset()


def live_nodes() -> list[RayNode]:
    """The live nodes of the Ray cluster this process is connected to, from `ray.nodes()`:
    membership and totals (what other Ray jobs hold is not in it: a grant Ray cannot honour
    in time goes back to the queue instead, see executor.py)."""
    import ray

    found = []
    for node in ray.nodes():  # type: ignore[no-untyped-call]
        if not node.get("Alive"):
            continue
        res: dict[str, float] = node.get("Resources", {})
        capacity = Resources(
            cpus=float(res.get("CPU", 0)),
            gpus=float(res.get("GPU", 0)),
            memory=float(res.get("memory", 0)),
            custom=_custom(res),
        )
        found.append(
            RayNode(
                str(node["NodeID"]),
                str(node.get("NodeManagerAddress", "")),
                capacity,
                partitions_of(node.get("Labels") or {}),
            )
        )
    return found


# the Ray node label that names a node's partition: `ray start --labels='{"runner.partition":
# "gpu"}'`; a node in several partitions carries one `runner.partition/NAME` label for each
# (a label value cannot hold a list)
PARTITION_LABEL = "runner.partition"


def partitions_of(labels: Mapping[str, str]) -> frozenset[str]:
    """The partitions a node belongs to, from its Ray node labels."""
    found = {str(v) for k, v in labels.items() if k == PARTITION_LABEL and v}
    prefix = f"{PARTITION_LABEL}/"
    found |= {k[len(prefix) :] for k in labels if k.startswith(prefix) and len(k) > len(prefix)}
    return frozenset(found)


# what Ray reports of every node besides its custom resources (`node:IP`, `accelerator_type:X`
# and the like have a colon)
_RAY_OWN = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


def _custom(res: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    """A node's custom resources (e.g. `runner_gpu_<i>`), so the scheduler accounts for them."""
    return tuple(
        sorted((k, float(v)) for k, v in res.items() if k not in _RAY_OWN and ":" not in k)
    )


def describe_ray() -> ClusterInfo:
    """The live nodes of the Ray cluster this process is connected to."""
    import ray

    nodes = live_nodes()
    if not nodes:
        raise ClusterError("the Ray cluster has no live nodes")
    address = ray.get_runtime_context().gcs_address
    return ClusterInfo(
        tuple(n.capacity for n in nodes),
        f"Ray at {address}: {len(nodes)} node(s)",
        tuple(n.node_id for n in nodes),
        tuple(n.ip for n in nodes),
        tuple(sorted(set().union(*(n.partitions for n in nodes)))),
        tuple(n.partitions for n in nodes),
    )


def _default_memory() -> float:
    """What Ray would offer tasks by default: about 70% of this machine's available memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 * 0.7
    except OSError:
        pass
    return float(8 << 30)


SIM_NODE_KEYS = ("count", "cpus", "gpus", "gpu_memory_gb", "memory")
# the most nodes a simulated cluster may declare: fifty times Ray's largest tested cluster
MAX_SIM_NODES = 100_000


def describe_sim(cfg: ClusterConfig) -> ClusterInfo:
    """The declared nodes of a simulated cluster (`cluster.nodes`, memory in GB)."""
    problems: list[str] = []
    nodes: list[Resources] = []
    gpu_memory: list[float] = []
    if not cfg.nodes:
        problems.append(
            "cluster.nodes: missing: a simulated cluster needs nodes, e.g. "
            "[{count: 4, cpus: 32, gpus: 8, gpu_memory_gb: 80, memory: 512}]"
        )
    for i, entry in enumerate(cfg.nodes):
        for key, value in entry.items():
            path = f"cluster.nodes[{i}].{key}"
            if key not in SIM_NODE_KEYS:
                problems.append(f"{path}: unknown key (allowed: {', '.join(SIM_NODE_KEYS)})")
            elif not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                problems.append(f"{path}: = {value!r}: expected a number >= 0")
            elif key == "count" and value != int(value):  # 2.5 nodes were 2, silently
                problems.append(f"{path}: = {value!r}: expected a whole number of nodes")
        if problems:
            continue
        node = Resources(
            cpus=_amount(entry, "cpus", 0),
            gpus=_amount(entry, "gpus", 0),
            memory=_amount(entry, "memory", 0) * (1 << 30),
        )
        count = int(_amount(entry, "count", 1))
        if len(nodes) + count > MAX_SIM_NODES:  # a node is an object: 10^8 of them never end
            raise SpecError(
                [
                    f"cluster.nodes[{i}].count: = {count}: the simulator takes at most "
                    f"{MAX_SIM_NODES:,} nodes in all"
                ]
            )
        nodes += [node] * count
        gpu_memory += [_amount(entry, "gpu_memory_gb", math.inf)] * count
    if problems:
        raise SpecError(problems)
    if not nodes:
        raise SpecError(["cluster.nodes: every entry has count 0: no node to simulate"])
    total = ClusterInfo(tuple(nodes), "").total
    where = f"simulated cluster: {len(nodes)} node(s), {total.describe()}"
    return ClusterInfo(tuple(nodes), where, gpu_memory_gb=tuple(gpu_memory))


def describe(cfg: ClusterConfig) -> ClusterInfo:
    """Describe without starting anything where possible (local, sim), else connect and look."""
    if cfg.kind == "sim":
        return _declared(cfg, describe_sim(cfg))
    import_ray = cfg.kind == "ray" or ray_running_here()
    if not import_ray:
        return _declared(cfg, describe_local(cfg))
    with connected(cfg, None) as info:
        return info


def _live(cfg: ClusterConfig) -> ClusterInfo:
    """The live Ray cluster; the embedded one (`cluster=local`) with its declared partitions."""
    info = describe_ray()
    return _declared(cfg, info) if cfg.kind == "local" else info


def _declared(cfg: ClusterConfig, info: ClusterInfo) -> ClusterInfo:
    """The embedded (or simulated) cluster with the partitions its config declares (all of
    them on every node)."""
    return dataclasses.replace(info, partitions=tuple(cfg.partitions), node_partitions=())


def ray_running_here() -> bool:
    import sys

    if "ray" not in sys.modules:
        return False
    import ray

    return bool(ray.is_initialized())


@contextmanager
def connected(
    cfg: ClusterConfig, pids_file: Path | None, caught: Sequence[int] = ()
) -> Iterator[ClusterInfo]:
    """Ray for the length of a run: reuse one already initialized in this process (tests,
    notebooks), else start an embedded one or connect to `RAY_ADDRESS` / `cluster.address`.
    `caught`: the signals the caller's handlers have noted so far (`_Starter`)."""
    import ray

    if ray.is_initialized():
        yield _live(cfg)
        return
    local = cfg.kind == "local"
    started = ended = False
    starter = _Starter()
    try:
        with procs.marked(pids_file) if local and pids_file else nullcontext():
            _start(cfg, starter, caught, pids_file)
            started = True
            yield _live(cfg)
            ended = True
    finally:
        if not ended and local:
            # interrupted (or its start failed): a signal to the whole process group may have
            # left Ray's own processes half-stopped, and Ray's graceful shutdown then waits on
            # them forever; a start cut short leaves them half-started
            left = []
            for pid in procs.descendants(os.getpid()):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    left.append(pid)
            procs.wait_gone(left, KILL_WAIT)
        if started and ray_alive():
            ray.shutdown()
        elif started and (_core or _lost):
            _abandon()
        starter.close()
        _core.clear()
        _lost.clear()
        if pids_file is not None:
            pids_file.unlink(missing_ok=True)
        scratch.sweep()  # what the run's killed workers on this node left


def _start(
    cfg: ClusterConfig, starter: _Starter, caught: Sequence[int], pids_file: Path | None
) -> None:
    """Start the embedded Ray (`cluster=local`), its processes recorded in `pids_file` while it
    starts (its agents are up a second before `ray.init` returns: a runner SIGKILLed meanwhile
    leaves them to the next run) and once it runs; or connect to the cluster."""
    if cfg.kind != "local":
        starter.start(lambda: _init_remote(cfg), caught)
        return
    if pids_file is None:
        starter.start(lambda: _init_local(cfg, describe_local(cfg)), caught)
    else:
        starter.start(
            lambda: _init_local(cfg, describe_local(cfg)), caught, partial(_record, pids_file)
        )
        procs.record_children(pids_file)
    _core.extend(_core_processes())


def _record(pids_file: Path) -> None:
    """The processes of a Ray still starting, recorded (a full disk is met, and said, by the
    record made once it runs)."""
    with suppress(OSError):
        procs.record_children(pids_file)


class _Starter:
    """Starts Ray (`ray.init`) such that a SIGINT or SIGTERM meanwhile is left to the
    handlers the caller installed (`execute.stop_on_signals`: the first one stops the run once
    Ray runs, before any unit starts; a second raises KeyboardInterrupt in `start`).

    On the main thread `ray.init` puts in its own SIGTERM handler (`sys.exit`), and the
    exception either signal raises inside it leaves a half-started driver: the interpreter
    then crashed at exit (SIGSEGV, SIGABRT) and Ray's agents outlived the run. On a thread of
    its own Ray sets no handler, while the main thread waits, free to run the caller's. That
    thread stays until Ray is let go (`close`): Ray's GCS server and raylet are killed when the
    thread that started them ends (`PR_SET_PDEATHSIG` follows the thread, not the process).
    Once Ray runs, the Python handler of SIGTERM is put back in front of the one Ray's driver
    installs in C++, which would first print a stack dump."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def start(
        self,
        init: Callable[[], None],
        caught: Sequence[int],
        meanwhile: Callable[[], None] | None = None,
    ) -> None:
        """`init` on the starting thread, waited for here (calling `meanwhile` every
        `JOIN_STEP`); given up once a signal was `caught` and Ray's own processes died of it
        (one to the whole process group reaches them: Ray's start would then wait a minute for
        its GCS)."""
        if threading.current_thread() is not threading.main_thread():
            init()
            return
        failed: list[BaseException] = []
        ready = threading.Event()

        def run() -> None:
            try:
                init()
            except BaseException as exc:  # raised in `start`, on the caller's thread
                failed.append(exc)
            ready.set()
            self.release.wait()

        thread = threading.Thread(target=run, name="ray-start", daemon=True)
        thread.start()
        try:
            while not ready.wait(JOIN_STEP):
                if meanwhile is not None:
                    meanwhile()
                if caught and _core_died():
                    raise Interrupted(caught[0], "while Ray started")
        except BaseException:  # given up, or forced out: the driver is half-made
            _abandon()
            raise
        handler = signal.getsignal(signal.SIGTERM)
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
        if failed:
            raise failed[0]

    def close(self) -> None:
        """Ray is let go (or never started): the thread that started it may end."""
        self.release.set()


# how often the main thread waiting for Ray's start looks up (a signal's handler runs at once)
JOIN_STEP = 0.1


def _abandon() -> None:
    """The embedded Ray is dead (killed by the runner, or by a signal to the whole group), or
    the cluster was lost (`lose`): its driver must not say goodbye to it. Ray's own exit hook
    would wait on the dead GCS (5 s, and under load up to Ray's 60 s reconnect timeout, after
    which Ray ends the process with exit 1 instead of 130/143)."""
    import atexit

    import ray

    atexit.unregister(ray.shutdown)
    _abandoned.append(True)


def end_process(code: int) -> int:
    """For the `runner` command once it is done: when the embedded Ray died under the run, end
    the process here (stdio flushed) with `code`. The Ray driver left in it would otherwise
    crash the interpreter's teardown (SIGSEGV or SIGABRT instead of 130/143). Returns `code`
    when Ray is fine."""
    if not _abandoned:
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(code)


# set once the embedded Ray died under the run and its driver was left as it was
_abandoned: list[bool] = []


# seconds to wait for the embedded Ray's processes to be gone once killed
KILL_WAIT = 2.0
# the embedded Ray's own GCS server and raylet (pid, start time), while this process runs one
_core: list[tuple[int, float | None]] = []
_CORE_NAMES = ("gcs_server", "raylet")


def _core_processes() -> list[tuple[int, float | None]]:
    found = []
    for pid in procs.descendants(os.getpid()):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name in _CORE_NAMES:
            found.append((pid, procs.start_time(pid)))
    return found


def _core_died() -> bool:
    """Whether the GCS server or raylet this process started has exited (a zombie: the thread
    that started it has not reaped it)."""
    return any(not procs.running(pid, started) for pid, started in _core_processes())


def ray_alive() -> bool:
    """False once the embedded Ray's GCS server or raylet is gone (a SIGTERM to the runner's
    whole process group reaches them too), or the cluster was found `lost`: every Ray call
    would then hang, so the run ends without them. A Ray this process did not start is taken
    as alive until then."""
    return not _lost and all(procs.running(pid, started) for pid, started in _core)


def lose(why: str) -> None:
    """The cluster went away under the run (`why`: how it was seen): Ray is not to be asked
    anything more (Ray ends the process a minute after its GCS went silent, exit 1 and a line of
    its own, whatever the run was doing), and the run's Ray is let go without a goodbye; the
    error that says so is `lost()`."""
    import ray

    if not _lost:
        _lost.append(ClusterLost(ray.get_runtime_context().gcs_address, why))


def lost() -> ClusterLost | None:
    """The error that ended the run's Ray, once the cluster was found gone (`lose`)."""
    return _lost[0] if _lost else None


# set once the cluster went away under the run
_lost: list[ClusterLost] = []


# The raylet starts its object store on a thread and connects to it at once, with Ray's client
# retry: 10 tries a second apart. A connect that comes before the store listens costs the
# start a whole second (in half the embedded starts on a busy 2-core machine); here the same
# 10 s window in steps of 0.1 s. A user's own `RAY_<name>` for either is left to rule both.
CONNECT_RETRY = {
    "raylet_client_connect_timeout_milliseconds": 100,
    "raylet_client_num_connect_attempts": 100,
}


def system_config() -> dict[str, int]:
    """Ray's internal settings for the embedded Ray (`CONNECT_RETRY`), none where the user's
    environment sets them."""
    if any(f"RAY_{name}" in os.environ for name in CONNECT_RETRY):
        return {}
    return dict(CONNECT_RETRY)


def _init_local(cfg: ClusterConfig, info: ClusterInfo) -> None:
    """Start this run's own embedded Ray. `address="local"` makes Ray ignore RAY_ADDRESS and
    any Ray already running on the host: cluster=local means a Ray of our own."""
    import ray

    if cfg.dashboard:
        _require_extra("dashboard", "the Ray dashboard (cluster.dashboard=true)")
    node = info.nodes[0]
    # one custom resource per GPU NVML lists, so a shard can ask for exactly its GPUs
    named = {gpus.resource(g.index): 1.0 for g in gpus.inventory()} if node.gpus else {}
    try:
        with _quiet(cfg.verbose):
            context = ray.init(
                address="local",
                num_cpus=round(node.cpus),
                num_gpus=int(node.gpus),
                resources=named or None,
                _memory=int(node.memory),
                object_store_memory=cfg.object_store_mb << 20,
                include_dashboard=cfg.dashboard,
                dashboard_host="127.0.0.1",
                log_to_driver=cfg.log_to_driver,
                logging_level=_ray_log_level(cfg.verbose),
                configure_logging=True,
                _system_config=system_config() or None,
            )
    except Exception as exc:  # Ray raises many types here; all mean "could not start"
        raise ClusterError(f"could not start a local Ray: {exc}") from exc
    if cfg.dashboard:
        log.info("Ray dashboard: http://%s", context.dashboard_url)


def _init_remote(cfg: ClusterConfig) -> None:
    """Connect to an existing cluster, giving up after `cluster.connect_timeout` seconds: Ray
    itself retries an unreachable address for many minutes."""
    import ray

    address = os.environ.get("RAY_ADDRESS") or cfg.address or "auto"
    if address.startswith("ray://"):
        _require_extra("client", f"a ray:// address ({address})")
    if address != "auto":
        _wait_reachable(address, cfg.connect_timeout)
    if not address.startswith("ray://"):  # Ray Client carries no token of its own
        gcs = _bootstrap(address)
        if gcs is not None:
            bound = min(cfg.connect_timeout, ray_auth.ASK_BOUND)
            ray_auth.authenticate(address, gcs, cfg.verbose, bound)
    try:
        with _quiet(cfg.verbose):
            ray.init(
                address=address,
                log_to_driver=cfg.log_to_driver,
                logging_level=_ray_log_level(cfg.verbose),
            )
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError by Ray version
        hint = "\n  set RAY_ADDRESS (or cluster.address) to a running cluster, or use cluster=local"
        if type(exc).__name__ == "AuthenticationError":  # the address is right: its own fix
            hint = ""
        raise ClusterError(f"could not connect to Ray at {address!r}: {exc}{hint}") from exc


def _bootstrap(address: str) -> str | None:
    """The GCS address `ray.init(address)` would connect to (`auto`: the cluster started on
    this host), or None when Ray cannot tell (`ray.init` then says why)."""
    from ray._private import services

    try:
        return services.canonicalize_bootstrap_address(address)
    except Exception:  # ConnectionError, ValueError: left to ray.init's own message
        return None


def _wait_reachable(address: str, timeout: float) -> None:
    """Return once `address` (`[ray://]host:port`) accepts a TCP connection; a ClusterError
    naming the address and the timeout after `timeout` seconds of refusals or silence."""
    hostport = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(
            f"cluster.address: = {address!r}: expected HOST:PORT, ray://HOST:PORT or auto"
        )
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(left, 0.1)):
                return
        except OSError as exc:
            if time.monotonic() + 0.5 >= deadline:
                raise ClusterError(
                    f"could not reach Ray at {address!r} within {timeout:g} s "
                    f"(cluster.connect_timeout): {exc.strerror or exc}\n"
                    "  is the cluster up and the address right? set RAY_ADDRESS or "
                    "cluster.address, raise cluster.connect_timeout, or use cluster=local"
                ) from exc
            time.sleep(0.5)


# what each extra brings, and how to tell it is installed (Ray's own checks)
_EXTRAS = {
    "client": "get_ray_client_dependency_error",
    "dashboard": "get_dashboard_dependency_error",
}


def _require_extra(extra: str, what: str) -> None:
    """A ClusterError naming `pip install DIST[extra]` when Ray's optional parts are missing."""
    from ray._private import utils

    missing = getattr(utils, _EXTRAS[extra])()
    if missing is not None:
        raise ClusterError(
            f"{what} needs Ray's optional packages ({missing}): pip install '{DIST}[{extra}]'"
        )


def _ray_log_level(verbose: bool) -> int:
    return logging.INFO if verbose else logging.ERROR


@contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Hide Ray's start-up chatter (its warnings about /dev/shm, usage stats, deprecations)
    unless `cluster.verbose`: a user's terminal should show runner's messages first."""
    if verbose:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _amount(entry: Mapping[str, object], key: str, default: float) -> float:
    """A simulated node's amount of `key` (its entry was checked: numbers only)."""
    value = entry.get(key, default)
    return float(value) if isinstance(value, int | float) else default
