"""When to save, what to keep, and the option groups of :class:`ckpt.CheckpointManager`.

    CheckpointManager(run, save=500, keep=3)                       # every 500 steps, the last 3
    CheckpointManager(run, save=[EverySteps(500), EverySeconds(1800)],
                      keep=[KeepLast(3), KeepEvery(10_000)],
                      memory=MemoryTierOptions(every=1, replicas=1),
                      preemption=PreemptionOptions(signals=[signal.SIGUSR1]))

A save policy answers "is this step due?"; a retention policy answers "which of these
steps stay?" (a step kept by any rule stays; the newest always stays). Both are small
value objects; any object with the same method works.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from ckpt.errors import ConfigError

__all__ = ["SavePolicy", "EverySteps", "EverySeconds", "RetentionPolicy", "KeepLast", "KeepEvery",
           "MemoryTierOptions", "PreemptionOptions", "save_policies", "retention_policies", "kept_steps", "dropped_steps"]


@runtime_checkable
class SavePolicy(Protocol):
    def should_save(self, step: int, now: float, last_time: float) -> bool:
        """Whether ``step`` (just finished) is saved; ``now`` and ``last_time`` (the last
        save's) are ``time.monotonic()`` values."""
        ...


@dataclasses.dataclass(frozen=True)
class EverySteps:
    """Steps ``n-1, 2n-1, ...`` (the step that completes every ``n``-th step)."""

    n: int

    def should_save(self, step: int, now: float, last_time: float) -> bool:
        return self.n > 0 and (step + 1) % self.n == 0


@dataclasses.dataclass(frozen=True)
class EverySeconds:
    """The first step at least ``seconds`` after the last save (agreed over all ranks)."""

    seconds: float

    def should_save(self, step: int, now: float, last_time: float) -> bool:
        return now - last_time >= self.seconds


@runtime_checkable
class RetentionPolicy(Protocol):
    def keep(self, steps: Sequence[int]) -> set[int]:
        """The committed ``steps`` this rule keeps."""
        ...


@dataclasses.dataclass(frozen=True)
class KeepLast:
    k: int

    def keep(self, steps: Sequence[int]) -> set[int]:
        return set(sorted(steps)[-self.k:]) if self.k > 0 else set()


@dataclasses.dataclass(frozen=True)
class KeepEvery:
    """Steps that complete every ``m``-th step (``(step + 1) % m == 0``), forever."""

    m: int

    def keep(self, steps: Sequence[int]) -> set[int]:
        return {s for s in steps if self.m > 0 and (s + 1) % self.m == 0}


def _policy_list(value: Any, proto: type, make: Any, what: str, unit: str, method: str, named: str) -> list[Any]:
    """``what=`` in its three spellings: an int (``make(int)``), one ``proto``, or several."""
    if value is None:
        return []
    if isinstance(value, bool):
        raise ConfigError(f"{what}={value!r}: give a number of {unit} or a {proto.__name__}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{what}={value}: a number of {unit} is >= 1 (None: {named})")
        return [make(value)]
    if isinstance(value, proto):
        return [value]
    items = list(value)
    bad = [p for p in items if not isinstance(p, proto)]
    if bad:
        raise ConfigError(f"{what}=: {bad[0]!r} is not a {proto.__name__} (an object with {method})")
    return items


def save_policies(save: int | SavePolicy | Iterable[SavePolicy] | None, *, what: str = "save") -> list[SavePolicy]:
    """``save=``: an int (every that many steps, EverySteps), a policy, or several."""
    return _policy_list(save, SavePolicy, EverySteps, what, "steps", "should_save(step, now, last_time)",
                        "saves only on demand")


def retention_policies(keep: int | RetentionPolicy | Iterable[RetentionPolicy] | None) -> list[RetentionPolicy]:
    """``keep=``: an int (the last that many, KeepLast), a policy, or several."""
    return _policy_list(keep, RetentionPolicy, KeepLast, "keep", "checkpoints", "keep(steps)", "keeps all")


def kept_steps(steps: Sequence[int], rules: Sequence[RetentionPolicy], *, pinned: Iterable[int] = ()) -> set[int]:
    """The steps that stay: the newest, every one a rule keeps, and ``pinned``."""
    keep: set[int] = {max(steps)} if steps else set()
    for rule in rules:
        keep |= rule.keep(steps)
    keep.update(pinned)
    return keep


def dropped_steps(steps: Sequence[int], rules: Sequence[RetentionPolicy], *, pinned: Iterable[int] = ()) -> list[int]:
    """The one retention routine (the manager's checkpoints, the memory tier's steps):
    the steps no rule keeps (:func:`kept_steps`), oldest first. Retention deletes each
    one's commit first, then its data; the last of them (the newest that goes) is the one
    a recycling store keeps as its recycle slot."""
    keep = kept_steps(steps, rules, pinned=pinned)
    return sorted(s for s in set(steps) if s not in keep)


@dataclasses.dataclass(frozen=True)
class MemoryTierOptions:
    """The memory tier (:class:`ckpt.elastic.MemoryTier`; docs/memory-tier.md).

    ``every``: when a tier step is taken (an int is every that many steps, or a
    SavePolicy). ``keep``: tier steps a node holds at most (>= 2: the newest complete one
    and the one being written). ``replicas``: other nodes that hold a copy of each node's
    files. ``max_bytes``: a node's tier budget (default: what the directory's file system
    has free). ``node_dir``: overrides ``CKPT_NODE_DIR``. ``drain``: a persistent save due
    on a tier step is copied from the tier's files once the step is held, instead of
    staging the state a second time.
    """

    every: int | SavePolicy = 1
    keep: int = 2
    replicas: int = 1
    max_bytes: int | None = None
    node_dir: str | None = None
    drain: bool = True

    def __post_init__(self) -> None:
        save_policies(self.every, what="MemoryTierOptions.every")
        if self.keep < 2 or self.replicas < 0 or (self.max_bytes is not None and self.max_bytes <= 0):
            raise ConfigError(f"MemoryTierOptions: keep={self.keep} (>= 2: the newest complete step and the one "
                              f"being written), replicas={self.replicas} (>= 0), max_bytes={self.max_bytes} (> 0 "
                              f"or None)")

    @property
    def schedule(self) -> list[SavePolicy]:
        return save_policies(self.every, what="MemoryTierOptions.every")


@dataclasses.dataclass(frozen=True)
class PreemptionOptions:
    """What the manager does on a preemption notice.

    ``signals``: the signals that mean "save now and stop" (default: SIGTERM and SIGUSR1;
    SIGUSR1 alone under a torchrun elastic agent, where SIGTERM means "your group
    restarts"); ``()`` installs no handler. On one, the next ``step()`` saves, waits for
    the commit and, with ``exit=True``, exits the process with status 0 (``exit=False``
    sets ``manager.preempted`` instead).
    """

    signals: Sequence[int] | None = None
    exit: bool = True
