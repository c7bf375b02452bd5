"""A bundle of resources (CPUs, GPUs, memory, custom) with the arithmetic the scheduler needs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

_EPS = 1e-9


@dataclass(frozen=True)
class Resources:
    """What one unit asks for, or what a node or a cluster has. Memory is in bytes."""

    cpus: float = 0.0
    gpus: float = 0.0
    memory: float = 0.0
    custom: tuple[tuple[str, float], ...] = field(default=())

    def __hash__(self) -> int:
        """Hashed as its fields are; remembered, since the scheduler keys its queues and
        indexes by shape. Only without custom resources: a string's hash differs from process
        to process, and a remembered one would travel with the object to Ray's workers."""
        cached: int | None = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.cpus, self.gpus, self.memory, self.custom))
            if not self.custom:
                object.__setattr__(self, "_hash", cached)
        return cached

    def __add__(self, other: Resources) -> Resources:
        return self._combine(other, 1.0)

    def __sub__(self, other: Resources) -> Resources:
        return self._combine(other, -1.0)

    def scale(self, factor: float) -> Resources:
        custom = tuple((k, v * factor) for k, v in self.custom)
        return Resources(self.cpus * factor, self.gpus * factor, self.memory * factor, custom)

    def fits_in(self, capacity: Resources) -> bool:
        """True when every amount asked for is available in `capacity`."""
        if (
            self.cpus > capacity.cpus + _EPS
            or self.gpus > capacity.gpus + _EPS
            or self.memory > capacity.memory + _EPS
        ):
            return False
        if not self.custom:  # the common case, on the scheduler's hot path: no dict to build
            return True
        have = dict(capacity.custom)
        return all(v <= have.get(k, 0.0) + _EPS for k, v in self.custom)

    def shortfall(self, capacity: Resources) -> str:
        """What `capacity` lacks to hold this, in words ('4 CPUs wanted, 2 available')."""
        parts = []
        if self.cpus > capacity.cpus + _EPS:
            parts.append(f"{self.cpus:g} CPUs wanted, {capacity.cpus:g} available")
        if self.gpus > capacity.gpus + _EPS:
            parts.append(f"{self.gpus:g} GPUs wanted, {capacity.gpus:g} available")
        if self.memory > capacity.memory + _EPS:
            parts.append(f"{gib(self.memory)} memory wanted, {gib(capacity.memory)} available")
        have = dict(capacity.custom)
        parts += [
            f"{v:g} {k} wanted, {have.get(k, 0):g} available"
            for k, v in self.custom
            if v > have.get(k, 0)
        ]
        return ", ".join(parts)

    def ray_options(self) -> dict[str, object]:
        """Keyword options for `.options()` of a Ray task or actor."""
        options: dict[str, object] = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory:
            options["memory"] = int(self.memory)
        if self.custom:
            options["resources"] = dict(self.custom)
        return options

    def describe(self) -> str:
        parts = [f"{self.cpus:g} CPU"]
        if self.gpus:
            parts.append(f"{self.gpus:g} GPU")
        if self.memory:
            parts.append(f"{gib(self.memory)} mem")
        parts += [f"{v:g} {k}" for k, v in self.custom]
        return ", ".join(parts)

    def _combine(self, other: Resources, sign: float) -> Resources:
        if not self.custom and not other.custom:  # the scheduler's hot path: no dict to build
            return _plain(
                self.cpus + sign * other.cpus,
                self.gpus + sign * other.gpus,
                self.memory + sign * other.memory,
            )
        custom = dict(self.custom)
        for k, v in other.custom:
            custom[k] = custom.get(k, 0.0) + sign * v
        return Resources(
            self.cpus + sign * other.cpus,
            self.gpus + sign * other.gpus,
            self.memory + sign * other.memory,
            tuple(sorted(custom.items())),
        )


# no resources: a default where none are held (the class is frozen, so one is shared)
NOTHING = Resources()


def total(parts: Iterable[Resources]) -> Resources:
    """The sum of `parts` (none: nothing), made once rather than one sum per part."""
    cpus = gpus = memory = 0.0
    custom: dict[str, float] | None = None
    for p in parts:
        cpus += p.cpus
        gpus += p.gpus
        memory += p.memory
        if p.custom:
            custom = custom if custom is not None else {}
            for k, v in p.custom:
                custom[k] = custom.get(k, 0.0) + v
    if custom is None:
        return _plain(cpus, gpus, memory)
    return Resources(cpus, gpus, memory, tuple(sorted(custom.items())))


_new = object.__new__


def _plain(cpus: float, gpus: float, memory: float) -> Resources:
    """`Resources(cpus, gpus, memory)`, at half the cost of a frozen dataclass's `__init__`
    (one `object.__setattr__` per field): the scheduler makes one per placement, release and
    preemption check."""
    r: Resources = _new(Resources)
    d = r.__dict__
    d["cpus"], d["gpus"], d["memory"], d["custom"] = cpus, gpus, memory, ()
    return r


def gib(nbytes: float) -> str:
    """Bytes as a short human figure ('1.5G', '512M')."""
    if nbytes >= 1 << 30:
        return f"{nbytes / (1 << 30):.3g}G"
    return f"{nbytes / (1 << 20):.0f}M"
