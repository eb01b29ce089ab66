"""ElasticSampler: a global position, so a resized job consumes each sample once."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt
from ckpt.elastic import ElasticSampler
from ckpt.errors import ReshardError


def _run(n: int, bs: int, worlds: list[int], steps: list[int], seed: int = 3) -> list[int]:
    """Consume ``steps[i]`` global steps at world size ``worlds[i]`` (the last runs to the
    end of the epoch), moving the state between phases as a checkpoint would."""
    seen: list[int] = []
    state = ElasticSampler(n, bs, rank=0, world_size=1, seed=seed).state_dict()
    for i, ws in enumerate(worlds):
        samplers = [ElasticSampler(n, bs, rank=r, world_size=ws, seed=seed) for r in range(ws)]
        for s in samplers:
            s.load_state_dict(state)
        its = [iter(s) for s in samplers]
        budget = steps[i] if i < len(worlds) - 1 else 10**9
        for _ in range(budget):
            if samplers[0].consumed >= n:
                break
            for it in its:
                seen += next(it)
        state = samplers[0].state_dict()
    return seen


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 300), bs=st.integers(1, 9),
       steps=st.lists(st.integers(0, 8), min_size=2, max_size=2))
def test_resize_4_3_2_consumes_the_epoch_exactly_once(n, bs, steps):
    seen = _run(n, bs, [4, 3, 2], steps + [0])
    assert sorted(seen) == list(range(n))
    # and in the permutation's order, block after block
    perm = ElasticSampler(n, bs, seed=3, rank=0, world_size=1).permutation().tolist()
    assert sorted(seen) == sorted(perm)


def test_same_world_size_matches_an_uninterrupted_run():
    a = _run(100, 4, [3, 3], [5, 0])
    b = _run(100, 4, [3], [0])
    assert a == b


def test_state_travels_through_a_checkpoint(tmp_path):
    s = ElasticSampler(50, 4, rank=0, world_size=2, seed=1)
    it = iter(s)
    next(it), next(it)
    ckpt.save({"sampler": s}, tmp_path / "c")
    t = ElasticSampler(50, 4, rank=1, world_size=3, seed=1)
    ckpt.load({"sampler": t}, tmp_path / "c")
    assert t.consumed == 16 and t.epoch == 0 and t.world_size == 3


def test_other_dataset_is_refused():
    s = ElasticSampler(50, 4, rank=0, world_size=1)
    with pytest.raises(ReshardError, match="dataset"):
        ElasticSampler(60, 4, rank=0, world_size=1).load_state_dict(s.state_dict())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 120), bs=st.integers(1, 7),
       plan=st.lists(st.tuples(st.integers(1, 4), st.booleans()), min_size=1, max_size=60))
def test_steps_that_roll_back_under_changing_quorums_consume_each_sample_once(n, bs, plan):
    """torchft's pattern: each step has its own set of participating groups, and a step
    that does not commit is served again to the groups of the retry."""
    groups = [ElasticSampler(n, bs, rank=0, world_size=1, seed=5) for _ in range(4)]
    seen: list[int] = []
    epochs_done = 0
    for world, commits in plan:
        batches = []
        for r in range(world):
            groups[r].set_world(r, world)
            batches += groups[r].batch()
        if commits:
            seen += batches
            for g in groups:  # every group whose step committed, taking part or not
                g.set_world(0, world)
                g.advance()
            if groups[0].epoch > epochs_done:  # an epoch ended: each sample exactly once
                epochs_done = groups[0].epoch
                assert sorted(seen) == list(range(n))
                seen = []
    assert len(set(seen)) == len(seen) and len({g.consumed for g in groups}) == 1
    assert groups[0].consumed == len(seen)


def test_batch_does_not_move_the_position_and_advance_rolls_the_epoch():
    s = ElasticSampler(10, 4, rank=0, world_size=2, shuffle=False)
    assert s.batch() == s.batch() == [0, 1, 2, 3] and s.consumed == 0
    s.advance()
    assert s.batch() == [8] and s.consumed == 8
    s.advance()
    assert (s.epoch, s.consumed) == (1, 0) and s.batch() == [0, 1, 2, 3]
