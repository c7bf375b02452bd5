"""How a `sleep` stage runs in the unit loop: one lease per unit, one task on it."""

from __future__ import annotations

from functools import partial

from runner.calls import Expect, Remote
from runner.kind import RunContext, StageKind, StageRun, Verdicts
from runner.lease import Ask, Lease, Work
from runner.lifecycle import UnitState
from runner.plan import StagePlan
from runner.resources import Resources
from runner.scheduler.policy import Policy
from runner.scheduler.request import Request
from runner.verdicts import Done, End, Failed, Launch
from tests.kinds.sleep import planning
from tests.kinds.sleep.schema import SleepStage
from tests.kinds.sleep.task import sleep_unit, timed_out


class SleepRun(StageRun):
    """Each unit a task of its own; a failed or timed-out reply fails the attempt (retried
    while `retries` last, then the unit ends FAILED or TIMEOUT); a preemptible unit stopped
    early runs again from the start."""

    grace = 2.0

    def __init__(self, stage: StagePlan, ctx: RunContext) -> None:
        assert isinstance(stage.spec, SleepStage)
        self.spec = stage.spec
        super().__init__(stage, ctx)
        self.retries = self.spec.retries
        # one request for every unit: its resources, priority, and whether it may be a victim
        self.request = Request(
            Resources(cpus=self.spec.cpus),
            self.spec.priority,
            policy=Policy(),
            preemptible=self.spec.preemptible,
        )

    def ask_for(self, work: Work) -> Ask:
        return Ask(self.request, work)

    def launch(self, lease: Lease) -> Verdicts:
        work = lease.work[0]
        fail = work.attempts < self.spec.fail.get(work.id, 0)
        remote = Remote(
            sleep_unit,
            (self.spec.seconds, fail, self.spec.timeout),
            options={"max_retries": 0, "name": f"sleep {work.id}"},
            announce=True,
            expect=partial(self._expect, work, fail),
        )
        yield Launch(lease, remote)

    def _expect(self, work: Work, fail: bool) -> Expect:
        """In virtual time: the measured or declared seconds (at most its timeout), the reply
        the task gives."""
        seconds = self.ctx.seconds(self.name, work.id, self.spec.seconds)
        timeout = self.spec.timeout
        if timeout is not None and seconds > timeout:
            return Expect(timeout, timed_out(timeout))
        reply = {"ok": False, "error": "told to fail this attempt"} if fail else {"ok": True}
        return Expect(seconds, {**reply, "slept": seconds})

    def on_reply(self, lease: Lease, tag: object, value: object) -> Verdicts:
        assert isinstance(value, dict)
        work = lease.work[0]
        yield End(lease)
        if value.get("ok"):
            yield Done(work, {"slept": value.get("slept")})
        else:
            state = UnitState.timeout if value.get("timeout") else UnitState.failed
            yield Failed(work, str(value.get("error")), state)


KIND = StageKind(SleepStage, planning.check, planning.plan, SleepRun, noun="sleeper")
