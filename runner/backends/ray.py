"""The unit loop's backend on Ray: the remote work a kind describes, started where the
scheduler placed it, and what came of it.

- **placement**: a `Remote` becomes an actor or a task whose options carry the grant's node
  (`NodeAffinitySchedulingStrategy(node, soft=False)`), or a placement group pinned to that
  node by Ray's `ray.io/node-id` label (Ray >= 2.49), so Ray runs it where the runner decided.
- **starts**: an actor answers `ready()` with where it runs; a task announces its start out of
  band (`placement.Starts`: a file under the run directory, or the run's inbox actor); a
  placement group is running once Ray says it is ready.
- **one wait**: `ray.wait` over every call in flight, replies and errors told apart (cancelled,
  the unit's own error, its worker or node lost).
- **going down with the run**: once the run is stopping, a signal to the whole process group may
  be taking the embedded Ray down; every call that could block on a GCS that is gone is bounded
  and skipped once Ray is seen gone, and what a unit left running is then ended by its pid.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

from runner import procs
from runner.backend import Began, Happened, Raised, Replied
from runner.calls import NEW_GROUP, Call, Remote
from runner.cluster import RayNode, live_nodes, lose, ray_alive
from runner.lease import Lease
from runner.placement import STARTED_KEY, Placement, Started, Starts, StartTo
from runner.remote import ActorKills, Asked, Made, bounded, error_line, plain, remote

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.util.placement_group import PlacementGroup

log = logging.getLogger(__name__)

# the tag of an actor's `ready()` call, and of a placement group's readiness
READY = "ready"
GROUP_READY = "group ready"
# the longest single wait: signals and deadlines are looked at least this often
WAIT_SECONDS = 0.1
# how often Ray's node membership is read again
NODES_EVERY = 2.0
# seconds the loop waits for that answer (milliseconds when the GCS is up), and how long the
# GCS may leave it unanswered before the cluster counts as lost: well within the minute after
# which Ray ends the process itself (`gcs_rpc_server_reconnect_timeout_s`)
NODES_WAIT = 0.5
LOST_AFTER = 10.0
# how often the starts tasks announced are looked for (a task that has answered is heard at
# once, `_deliver`): a look lists a directory or asks the inbox
LISTEN_EVERY = 0.05
# seconds a signal is given to end the embedded Ray's processes too, before Ray is asked anything
SIGNAL_SETTLE = 0.3
# seconds one clean-up call may wait on Ray once stopping (milliseconds when Ray is up)
CLEANUP_BOUND = 1.0
# ... and the run's inbox's removal at the end
CLOSE_BOUND = 5.0
# seconds between SIGTERM and SIGKILL for what a unit left running after the embedded Ray died
ORPHAN_GRACE = 1.0
# tasks with their options kept (`RayBackend._task`): a few per stage and node at most, unless
# a kind names each task (a shard stage's)
TASKS_KEPT = 1024
# the label Ray gives every node: its id
NODE_ID_LABEL = "ray.io/node-id"


class RayBackend:
    """Ray, as the unit loop uses it (`backend.Backend`)."""

    def __init__(self, run_dir: Path, shared_fs: bool, stop: threading.Event) -> None:
        self.stop = stop
        # in-flight references → (lease, the kind's tag for the reply)
        self.refs: dict[object, tuple[Lease, object]] = {}
        # leases whose task announces its start out of band, and where it does
        self.announced: dict[Lease, StartTo] = {}
        self.starts = Starts(run_dir, shared_fs)
        self.node_seen = -math.inf
        # the question for the live nodes in flight, and since when none was answered
        self.asking: Asked[list[RayNode]] | None = None
        self.unanswered: float | None = None
        self.listened = -math.inf
        # set once stopping met a Ray that is gone: no Ray call is made after that
        self.gone = False
        self.settled = False
        # actors of ended leases, killed once Ray has made them (`ActorKills`)
        self.kills = ActorKills()
        # tasks with their options, by what makes the options (`_task`)
        self.tasks: dict[tuple[object, ...], Made] = {}

    # --- time ------------------------------------------------------------------------------

    def clock(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    # --- starting work ---------------------------------------------------------------------

    def launch(self, lease: Lease, work: Remote) -> None:
        placement = lease.placement
        assert placement is not None
        if work.group is NEW_GROUP:
            lease.group = _new_group(placement)
        elif work.group is not None:
            lease.group = work.group
        if work.target is None:  # a placement group alone: running once Ray has reserved it
            self._watch(lease, lease.group.ready(), GROUP_READY)  # type: ignore[attr-defined]
            return
        if work.actor:
            options = {**_options(placement, lease.group), **work.options}
            lease.handle = remote(work.target).options(**options).remote(*work.args)
            self._watch(lease, lease.handle.ready.remote(), READY)  # type: ignore[attr-defined]
            return
        extra: dict[str, object] = {}
        if work.announce:
            to = self.starts.address()
            self.announced[lease] = to
            extra["started_to"] = plain(to)
        lease.handle = self._task(work, placement, lease.group).remote(*work.args, **extra)
        self._watch(lease, lease.handle, None)

    def _task(self, work: Remote, placement: Placement, group: object) -> Made:
        """`work`'s task with its options for `placement`, made once per node, resources and
        options, not once per task: Ray checks every option of each `.options()` (a job
        stage's tasks differ only in their arguments). A task in a placement group of its
        own, or with an option that does not hash, has its options made for it alone."""
        key: tuple[object, ...] | None = None
        made = None
        if group is None:
            try:
                key = (work.target, placement.node_id, placement.resources, *work.options.items())
                made = self.tasks.get(key)
            except TypeError:
                key = None
        if made is None:
            made = remote(work.target).options(**_options(placement, group), **work.options)
            if key is not None:
                if len(self.tasks) >= TASKS_KEPT:  # options that differ per task: none reused
                    self.tasks.clear()
                self.tasks[key] = made
        return made

    def call(self, lease: Lease, call: Call) -> None:
        method = getattr(lease.handle, call.method)
        self._watch(lease, method.remote(*call.args), call.tag)

    def _watch(self, lease: Lease, ref: object, tag: object) -> None:
        self.refs[ref] = (lease, tag)
        lease.calls[ref] = tag

    # --- stopping it -----------------------------------------------------------------------

    def cancel(self, lease: Lease) -> None:
        import ray

        def cancel() -> None:
            # a task that has already answered is not cancelled: Ray 2.60 can abort the driver
            # cancelling a task as it completes ("task that was not pending")
            done, _ = ray.wait([lease.handle], timeout=0)
            if not done:
                ray.cancel(lease.handle)

        self._on_ray(cancel)

    def kill(self, lease: Lease) -> None:
        import ray

        def kill() -> None:
            try:
                if lease.actor:
                    # one whose start was not heard yet: once Ray has made it (`ActorKills`)
                    up = lease.started is not None or self.stop.is_set()
                    self.kills.kill(lease.handle, now=up)
                    return
                # a task that has answered (cancelled, failed, done) is not cancelled again:
                # Ray 2.60 aborts the driver force-cancelling a task whose reply is in
                done, _ = ray.wait([lease.handle], timeout=0)
                if not done:
                    ray.cancel(lease.handle, force=True)
            except Exception as exc:  # Ray gone, the process dead already, done meanwhile
                log.debug("kill: %s", exc)

        self._on_ray(kill)

    def remove_group(self, group: object) -> None:
        def remove() -> None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(group)
            except Exception as exc:  # already gone (Ray shut down, or removed twice)
                log.debug("placement group: %s", exc)

        self._on_ray(remove)

    def _on_ray(self, clean_up: Callable[[], None]) -> None:
        """A Ray call on the way out. Once the run is stopping, a signal to the whole process
        group may be taking the embedded Ray down: a call to a GCS that is gone blocks for a
        minute (Ray's reconnect timeout), so it is bounded, and skipped once Ray is seen gone
        (its processes are then ended by pid, `orphan`)."""
        if not self.stop.is_set():
            clean_up()
            return
        if not self.alive():
            return
        if not bounded(clean_up, CLEANUP_BOUND):
            log.warning("Ray did not answer while a lease was given back; going on without it")
            self.gone = True

    # --- what happened ---------------------------------------------------------------------

    def wait(self, until: float) -> list[Happened]:
        import ray

        happened: list[Happened] = []
        timeout = max(0.0, min(until, time.monotonic() + WAIT_SECONDS) - time.monotonic())
        if self.refs:
            refs = list(self.refs)
            ready, rest = ray.wait(refs, num_returns=1, timeout=timeout)
            if ready and rest:
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            for ref in ready:
                self._deliver(ref, happened)
        else:
            self.stop.wait(timeout)
        self.kills.reap()
        self._listen(happened)
        return happened

    def _deliver(self, ref: object, happened: list[Happened]) -> None:
        lease, tag = self.refs.pop(ref)
        if lease.closed:
            return
        value, raised, ran = self._get(lease, ref, tag)
        if lease in self.announced:  # it ended before its start was heard: its start first
            self._ended_before_heard(lease, value, raised, ran, happened)
        if raised is not None:
            happened.append(raised)
        elif tag == GROUP_READY or isinstance(value, Started):
            lease.calls.pop(ref, None)  # not a call of the kind's: its start
            happened.append(Began(lease, value if isinstance(value, Started) else _now(lease)))
        else:
            happened.append(Replied(lease, ref, tag, value))

    def _ended_before_heard(
        self,
        lease: Lease,
        value: object,
        raised: Raised | None,
        ran: bool,
        happened: list[Happened],
    ) -> None:
        """The start of a task that answered before it was heard: carried in its reply (it
        ended before it had to say it, `Announcement`), else said (read now; waited for only
        when the task `ran`). A task that ran and raised (or lost its worker under it) without
        either ran all the same (it may be the job that killed its worker): it started here,
        now, and its attempt counts."""
        carried = value.pop(STARTED_KEY, None) if isinstance(value, dict) else None
        if carried is not None:
            where, said = Started(**carried), True
        else:
            self._hear(lease, happened, ended=ran)
            if lease not in self.announced or raised is None or not ran:
                return
            where, said = _now(lease), False
        self.starts.forget(self.announced.pop(lease))
        happened.append(Began(lease, where, said))

    @staticmethod
    def _get(lease: Lease, ref: object, tag: object) -> tuple[object, Raised | None, bool]:
        """What a call answered, or how it failed; and whether it ran (it answered, raised, or
        its worker died under it: not cancelled, nor refused before it began, as a runtime
        environment that could not be set up or a node that is gone)."""
        import ray

        try:
            return ray.get(cast("ObjectRef[object]", ref)), None, True
        except ray.exceptions.TaskCancelledError as exc:
            return None, Raised(lease, ref, tag, error_line(exc), cancelled=True), False
        except ray.exceptions.RayTaskError as exc:
            return None, Raised(lease, ref, tag, error_line(exc)), True
        except ray.exceptions.RayError as exc:  # its worker or node died
            died = isinstance(exc, ray.exceptions.NodeDiedError)
            why = f"its Ray worker died on {lease.node} ({type(exc).__name__}): {error_line(exc)}"
            ran = isinstance(
                exc, ray.exceptions.WorkerCrashedError | ray.exceptions.OutOfMemoryError
            )
            return None, Raised(lease, ref, tag, why, lost=True, node_died=died), ran

    def _listen(self, happened: list[Happened]) -> None:
        """Hear the starts tasks announced since the last look (at most every LISTEN_EVERY)."""
        now = time.monotonic()
        if not self.announced or now - self.listened < LISTEN_EVERY:
            return
        self.listened = now
        self.starts.turn()
        for lease in list(self.announced):
            if lease.closed:
                self.starts.forget(self.announced.pop(lease))
            else:
                self._hear(lease, happened)

    def _hear(self, lease: Lease, happened: list[Happened], ended: bool = False) -> None:
        where = self.starts.heard(self.announced[lease], ended)
        if where is not None:
            del self.announced[lease]
            happened.append(Began(lease, where))

    # --- the cluster -----------------------------------------------------------------------

    def nodes(self, force: bool = False) -> list[RayNode] | None:
        """The live nodes, asked on a thread of their own: a GCS that is gone (the cluster
        stopped, its head node down) never answers, and Ray ends the process a minute later.
        One that has answered nothing for LOST_AFTER seconds stops the run (`cluster.lose`)."""
        now = time.monotonic()
        if self.asking is None:
            if now - self.node_seen < NODES_EVERY and not force:
                return None
            self.node_seen = now
            self.asking = Asked(live_nodes)
            answered = self.asking.answered(NODES_WAIT)
        else:
            answered = self.asking.answered()
        asked = self.asking
        if answered:
            self.asking = None
        if answered and asked.value:
            self.unanswered = None
            return asked.value
        if answered and asked.error is None:  # not even the head node: the cluster stopped
            self._lose("none of its nodes is alive")
            return None
        if asked.error is not None:  # GCS unreachable for a moment: try again later
            log.debug("ray.nodes(): %s", asked.error)
        self.unanswered = now if self.unanswered is None else self.unanswered
        if now - self.unanswered >= LOST_AFTER:
            self._lose(f"it has not answered for {now - self.unanswered:.0f} s")
        return None

    def _lose(self, why: str) -> None:
        """The cluster is gone: the run stops without asking Ray anything more."""
        lose(why)
        self.stop.set()

    def alive(self) -> bool:
        """Whether Ray may still be asked anything. Once stopping, the first look lets a signal
        to the whole process group reach the embedded Ray's own processes first: they go down
        at the same moment, and a call to a GCS that is gone blocks for a minute."""
        if self.stop.is_set() and not self.settled:
            self.settled = True
            time.sleep(SIGNAL_SETTLE)
        self.gone = self.gone or not ray_alive()
        return not self.gone

    def orphan(self, lease: Lease) -> None:
        where = lease.started
        if where is None or where.host != socket.gethostname():
            return
        if procs.alive_since(where.pid, where.time):
            procs.kill_tree(where.pid, grace=ORPHAN_GRACE)

    def close(self) -> None:
        # actors still coming up: killed once up (at most CLOSE_BOUND), at once when stopping
        self._on_ray(lambda: self.kills.close(0.0 if self.stop.is_set() else CLOSE_BOUND))
        if self.alive() and not bounded(self.starts.close, CLOSE_BOUND):
            log.warning("Ray did not answer while the run's inbox was removed")


def _now(lease: Lease) -> Started:
    """A start not said by the process itself: on the lease's node, now."""
    assert lease.placement is not None
    place = lease.placement
    return Started(place.node_id, place.node_ip, "", 0, time.time())


def _options(placement: Placement, group: object) -> dict[str, object]:
    """`.options()` for the actor or task that runs on this placement: its resources, and its
    node (or its placement group's one bundle, pinned to the node)."""
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,
        PlacementGroupSchedulingStrategy,
    )

    strategy: object
    if group is not None:
        strategy = PlacementGroupSchedulingStrategy(cast("PlacementGroup", group), 0)
    else:
        strategy = NodeAffinitySchedulingStrategy(placement.node_id, soft=False)
    return {**placement.resources.ray_options(), "scheduling_strategy": strategy}


def _new_group(placement: Placement) -> object:
    """A new one-bundle placement group of the placement's resources that only its node can
    hold."""
    from ray.util.placement_group import placement_group

    r = placement.resources
    bundle = {"CPU": r.cpus, "GPU": r.gpus, "memory": float(int(r.memory)), **dict(r.custom)}
    return placement_group(
        [{k: v for k, v in bundle.items() if v > 0}],
        strategy="STRICT_PACK",
        bundle_label_selector=[{NODE_ID_LABEL: placement.node_id}] if placement.node_id else None,
    )
