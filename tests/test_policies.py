"""The manager's option groups: `save=` / `keep=` in their spellings, the memory tier's and
preemption's options objects, and the errors a wrong or old-style argument gets."""

from __future__ import annotations

import pytest
import torch

import ckpt
from ckpt.errors import ConfigError

NO_SIGNALS = ckpt.PreemptionOptions(signals=())


def _run(tmp_path, steps, **kw):
    with ckpt.CheckpointManager(tmp_path / "run", preemption=NO_SIGNALS, save_on_close=False, **kw) as mgr:
        for step in range(steps):  # a new tensor per step: nothing is modified under a snapshot
            mgr.step(step, {"w": torch.full((4,), float(step))})
    return sorted(c.step for c in ckpt.list_checkpoints(tmp_path / "run"))


def test_save_and_keep_as_numbers(tmp_path):
    assert _run(tmp_path, 9, save=2, keep=2) == [5, 7]


def test_save_and_keep_as_policies_and_lists(tmp_path):
    got = _run(tmp_path, 12, save=[ckpt.EverySteps(3), ckpt.EverySteps(4)],
               keep=[ckpt.KeepLast(1), ckpt.KeepEvery(6)])
    # saved at 2, 3, 5, 7, 8, 11; kept: the newest and those completing every 6th step
    assert got == [5, 11]


def test_a_custom_policy_is_a_save_policy(tmp_path):
    class Odd:
        def should_save(self, step, now, last_time):
            return step % 2 == 1

    assert isinstance(Odd(), ckpt.SavePolicy)
    assert _run(tmp_path, 6, save=Odd(), keep=None) == [1, 3, 5]


def test_every_seconds_saves_once_the_time_passed(tmp_path):
    # 0 s: every step is due (the clock policy is agreed over ranks; one rank here)
    assert _run(tmp_path, 3, save=ckpt.EverySeconds(0)) == [0, 1, 2]


@pytest.mark.parametrize("kw, match", [
    ({"save": 0}, "save=0"),
    ({"save": True}, "save=True"),
    ({"save": ["500"]}, "not a SavePolicy"),
    ({"keep": 0}, "keep=0"),
    ({"keep": [3]}, "not a RetentionPolicy"),
])
def test_bad_save_or_keep_is_a_config_error(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        ckpt.CheckpointManager(tmp_path / "run", preemption=NO_SIGNALS, **kw)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("kw", [{"keep": 1}, {"replicas": -1}, {"max_bytes": 0}, {"every": 0}])
def test_bad_memory_options(kw):
    with pytest.raises(ConfigError, match="MemoryTierOptions"):
        ckpt.MemoryTierOptions(**kw)


@pytest.mark.parametrize("old, new", [("every_steps", "save=N"), ("keep_last", "keep=K"),
                                      ("memory_every_steps", "MemoryTierOptions(every=...)"),
                                      ("save_on_signals", "PreemptionOptions(signals=...)")])
def test_old_keyword_names_say_what_replaced_them(tmp_path, old, new):
    with pytest.raises(TypeError, match=rf"{old}.*{new.replace('(', '[(]').replace(')', '[)]')}"):
        ckpt.CheckpointManager(tmp_path / "run", **{old: 1})


def test_memory_tier_schedule_is_a_save_policy(tmp_path):
    memory = ckpt.MemoryTierOptions(every=ckpt.EverySteps(2), replicas=0, node_dir=str(tmp_path / "node"))
    with ckpt.CheckpointManager(tmp_path / "run", memory=memory, preemption=NO_SIGNALS, save_on_close=False) as mgr:
        assert mgr.tier is not None
        assert [s for s in range(6) if mgr.tier.due(s)] == [1, 3, 5]
        for step in range(4):
            mgr.step(step, {"w": torch.full((4,), float(step))})
            mgr.tier.wait()  # a step still replicating would make the next one skip
        assert mgr.tier.stats.taken == 2


def test_one_retention_routine_drops_what_no_rule_keeps_oldest_first() -> None:
    from ckpt._policies import KeepEvery, KeepLast, dropped_steps

    steps = [9, 1, 3, 5, 7]
    assert dropped_steps(steps, [KeepLast(2)]) == [1, 3, 5]
    assert dropped_steps(steps, [KeepLast(1), KeepEvery(4)], pinned=[1]) == [5]  # 3 and 7 are every 4th
    assert dropped_steps(steps, []) == [1, 3, 5, 7]  # the newest always stays
    assert dropped_steps([], [KeepLast(1)]) == []
