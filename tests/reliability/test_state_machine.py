"""A Hypothesis state machine of save / crash / restore / retain / gc against a model of
which checkpoints must exist. Crashes are simulated exactly as the engine leaves them:
a ``.tmp-step-N-<hex>`` write directory with data, or a ``step-N`` directory without a
manifest (an object-store style or pre-rename leftover)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import ckpt
from ckpt import PreemptionOptions, tools
from tests.reliability import assert_bit_exact, blank_state, debris, make_state

ROWS = 128  # 512 KiB: above the pack threshold, so an array and a pack
RUNS = {"steps": 0, "examples": 0}


class CheckpointLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="ckpt-sm-")
        self.run = os.path.join(self.dir, "run")
        self.committed: set[int] = set()
        self.next_step = 1
        RUNS["examples"] += 1

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _url(self, s: int) -> str:
        return f"{self.run}/step-{s:09d}"

    @rule()
    def save(self) -> None:
        s = self.next_step
        self.next_step += 1
        ckpt.save(make_state(s, ROWS), self._url(s), step=s)
        self.committed.add(s)
        RUNS["steps"] += 1

    @rule(kind=st.sampled_from(["tmp", "no-manifest"]))
    def crash(self, kind: str) -> None:
        """What a save killed before its commit leaves behind (never a manifest)."""
        s = self.next_step  # the step the crashed save was writing; the next save reuses it
        name = f".tmp-step-{s:09d}-{uuid.uuid4().hex[:12]}" if kind == "tmp" else f"step-{s:09d}"
        d = os.path.join(self.run, name, "arrays", "w.zarr")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "c.0.0"), "wb") as f:
            f.write(os.urandom(1000))  # a partially written shard
        RUNS["steps"] += 1

    @rule()
    def restore(self) -> None:
        mgr = ckpt.CheckpointManager(self.run, preemption=PreemptionOptions(signals=()), save_on_close=False)
        state = blank_state(ROWS)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no checkpoint may need skipping
            start = mgr.restore(state)
        mgr.close()
        newest = max(self.committed, default=None)
        assert start == (newest + 1 if newest is not None else 0)
        if newest is not None:
            assert state["step"] == newest
        RUNS["steps"] += 1

    @rule(k=st.integers(1, 3))
    def retain(self, k: int) -> None:
        mgr = ckpt.CheckpointManager(self.run, keep=k, preemption=PreemptionOptions(signals=()), save_on_close=False)
        mgr.apply_retention()
        mgr.close()
        self.committed = set(sorted(self.committed)[-k:])
        RUNS["steps"] += 1

    @rule(k=st.one_of(st.none(), st.integers(1, 3)))
    def gc(self, k: int | None) -> None:
        tools.gc(self.run, keep_last=k, grace=0)
        if k is not None:
            self.committed = set(sorted(self.committed)[-k:])
        assert not debris(self.run)
        RUNS["steps"] += 1

    @invariant()
    def listing_matches_model(self) -> None:
        listed = [i.step for i in ckpt.list_checkpoints(self.run)]
        assert listed == sorted(self.committed, reverse=True), (listed, self.committed)

    @invariant()
    def every_committed_loads_bit_exact(self) -> None:
        for s in self.committed:
            assert_bit_exact(self._url(s), s, ROWS)


CheckpointLifecycle.TestCase.settings = settings(
    max_examples=15, stateful_step_count=10, deadline=None,
    suppress_health_check=list(HealthCheck))
TestCheckpointLifecycle = CheckpointLifecycle.TestCase


def test_report():
    print(f"\n[reliability] state machine: {RUNS['examples']} examples, {RUNS['steps']} rule steps")
