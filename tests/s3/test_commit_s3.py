"""The commit on object stores (moto and SeaweedFS, or CKPT_TEST_S3_ENDPOINT): of two
savers of one checkpoint name exactly one commits and the other gets
CheckpointExistsError, the committed checkpoint whole; an overwrite (``ckpt.save(...,
overwrite=True)``, ``ckpt reshard --overwrite``) replaces a committed checkpoint and
leaves none of the old one's objects."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import ckpt
from ckpt import tools
from ckpt.storage import open_storage
from tests.reliability import assert_bit_exact, blank_state, debris, make_state, race_savers

pytestmark = pytest.mark.s3


def test_two_savers_of_one_name_exactly_one_commits_a_whole_checkpoint(s3_url, s3_options):
    for n in range(3):
        run = f"{s3_url}/race{n}"
        # different states under one name: what loads tells whose checkpoint committed
        res = race_savers(run, [2, 3], name="ckpt", opts=s3_options)
        kinds = sorted(r[0] if r[0] == "ok" else r[1] for r in res)
        assert kinds == ["CheckpointExistsError", "ok"], res
        info = ckpt.list_checkpoints(run, storage_options=s3_options)
        assert [i.name for i in info] == ["ckpt"], info
        st = blank_state()
        ckpt.load(st, f"{run}/ckpt", storage_options=s3_options)
        winner = st["step"]
        assert winner in (2, 3)
        assert_bit_exact(f"{run}/ckpt", winner, storage_options=s3_options)
        report = tools.verify(f"{run}/ckpt", storage_options=s3_options)
        assert report.ok, report
        # the loser discarded what it wrote; nothing else is left
        assert debris(run, **s3_options) == []
        store = open_storage(run, **s3_options)
        prefixes = {o.path.split("/")[1] for o in store.list_files("ckpt") if o.path.count("/") > 1}
        assert len(prefixes) == 1, prefixes


def _objects(url: str, opts: dict[str, Any]) -> set[str]:
    return {o.path for o in open_storage(url, **opts).list_files()}


def test_overwrite_replaces_a_committed_checkpoint_and_its_objects(s3_url, s3_options):
    url = f"{s3_url}/run/ckpt"
    ckpt.save(make_state(2), url, step=2, storage_options=s3_options)
    before = _objects(url, s3_options)
    with pytest.raises(ckpt.errors.CheckpointExistsError):
        ckpt.save(make_state(3), url, step=3, storage_options=s3_options)
    assert_bit_exact(url, 2, storage_options=s3_options)  # the refused save left it whole

    ckpt.save(make_state(3), url, step=3, overwrite=True, storage_options=s3_options)
    assert_bit_exact(url, 3, storage_options=s3_options)
    assert tools.verify(url, storage_options=s3_options).ok
    after = _objects(url, s3_options)
    assert not (before - {"manifest.json"}) & after, "objects of the replaced checkpoint are left"
    assert [i.name for i in ckpt.list_checkpoints(f"{s3_url}/run", storage_options=s3_options)] == ["ckpt"]


def test_reshard_overwrite_on_s3(s3_url, s3_options):
    src, dst = f"{s3_url}/run/src", f"{s3_url}/run/dst"
    ckpt.save(make_state(4), src, step=4, storage_options=s3_options)
    ckpt.save(make_state(5), dst, step=5, storage_options=s3_options)
    with pytest.raises(ckpt.errors.CheckpointExistsError):
        tools.reshard(src, dst, 2, storage_options=s3_options)
    assert_bit_exact(dst, 5, storage_options=s3_options)
    tools.reshard(src, dst, 2, overwrite=True, storage_options=s3_options)
    assert_bit_exact(dst, 4, storage_options=s3_options)
    assert tools.verify(dst, storage_options=s3_options).ok
    st = blank_state()
    ckpt.load(st, dst, storage_options=s3_options)
    assert torch.equal(st["w"], make_state(4)["w"])
