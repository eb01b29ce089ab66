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
from typing import Protocol, runtime_checkable

from ckpt.errors import ConfigError

__all__ = ["SavePolicy", "EverySteps", "EverySeconds", "RetentionPolicy", "KeepLast", "KeepEvery",
           "MemoryTierOptions", "PreemptionOptions", "save_policies", "retention_policies", "kept_steps"]


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


def save_policies(save: int | SavePolicy | Iterable[SavePolicy] | None, *, what: str = "save") -> list[SavePolicy]:
    """``save=`` in its three spellings: an int (every that many steps), a policy, or several."""
    if save is None:
        return []
    if isinstance(save, bool):
        raise ConfigError(f"{what}={save!r}: give a number of steps (e.g. {what}=500) or a SavePolicy")
    if isinstance(save, int):
        if save < 1:
            raise ConfigError(f"{what}={save}: a number of steps is >= 1 (None saves only on demand)")
        return [EverySteps(save)]
    if isinstance(save, SavePolicy):
        return [save]
    policies = list(save)
    bad = [p for p in policies if not isinstance(p, SavePolicy)]
    if bad:
        raise ConfigError(f"{what}=: {bad[0]!r} is not a SavePolicy (an object with should_save(step, now, "
                          f"last_time)); use EverySteps(n) or EverySeconds(s)")
    return policies


def retention_policies(keep: int | RetentionPolicy | Iterable[RetentionPolicy] | None) -> list[RetentionPolicy]:
    """``keep=`` in its three spellings: an int (the last that many), a policy, or several."""
    if keep is None:
        return []
    if isinstance(keep, bool):
        raise ConfigError(f"keep={keep!r}: give a number of checkpoints (e.g. keep=3) or a RetentionPolicy")
    if isinstance(keep, int):
        if keep < 1:
            raise ConfigError(f"keep={keep}: keep at least 1 checkpoint (None keeps all)")
        return [KeepLast(keep)]
    if isinstance(keep, RetentionPolicy):
        return [keep]
    rules = list(keep)
    bad = [r for r in rules if not isinstance(r, RetentionPolicy)]
    if bad:
        raise ConfigError(f"keep=: {bad[0]!r} is not a RetentionPolicy (an object with keep(steps)); "
                          f"use KeepLast(k) or KeepEvery(m)")
    return rules


def kept_steps(steps: Sequence[int], rules: Sequence[RetentionPolicy], *, pinned: Iterable[int] = ()) -> set[int]:
    """The steps that stay: the newest, every one a rule keeps, and ``pinned``."""
    keep: set[int] = {max(steps)} if steps else set()
    for rule in rules:
        keep |= rule.keep(steps)
    keep.update(pinned)
    return keep


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
