"""What a `sleep` stage's spec may hold."""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.schema import StageSpec, limited, policy, resource


@dataclass
class SleepStage(StageSpec):
    """Units that each sleep for `seconds` in a Ray task, holding `cpus` meanwhile."""

    # how many units (named 0, 1, ...)
    units: int = limited(1, ge=1)
    # how long each unit sleeps
    seconds: float = limited(1.0, ge=0)
    # CPUs each unit's task holds
    cpus: float = resource(1.0, gt=0)
    # seconds a unit may sleep before it is stopped and recorded as timeout (then tried again
    # while `retries` last, as a failure is)
    timeout: float | None = policy(None, gt=0)
    # times a failed (or timed-out) unit is tried again
    retries: int = policy(0, ge=0)
    # unit -> how many of its first attempts fail (after sleeping): to test retries
    fail: dict[str, int] = field(default_factory=dict, metadata={"policy": True})
    # its units may be chosen as preemption victims (they are stopped, then run again)
    preemptible: bool = resource(False)
