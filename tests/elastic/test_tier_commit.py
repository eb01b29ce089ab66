"""The memory tier's per-node commit (:class:`ckpt._engine._commit.NodeCommit`): a
SIGKILL at any point of it leaves the node's previous copy of the step or the new one
whole, never a mix and never neither, once ``recover()`` ran (a restore runs it first)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ckpt._engine._commit import NodeCommit
from ckpt.storage import open_storage

NAME = "step-000000007"

_CHILD = textwrap.dedent('''
    import os, signal, sys
    from ckpt._engine._commit import NodeCommit
    from ckpt.storage import open_storage

    root, point = sys.argv[1], sys.argv[2]
    st = open_storage(root)
    cls = type(st)
    seen = {"rename": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    real_write, real_rename, real_delete = cls.write_bytes, cls.rename_dir, cls.delete_dir

    def write_bytes(self, path, data):
        if point == "manifest" and path.endswith("manifest.json"):
            real_write(self, path, data[:3])  # torn
            die()
        return real_write(self, path, data)

    def rename_dir(self, src, dst):
        seen["rename"] += 1
        if point == f"rename{seen['rename']}":
            die()
        return real_rename(self, src, dst)

    def delete_dir(self, prefix):
        if point == "trash" and ".tmp-trash-" in prefix:
            die()
        return real_delete(self, prefix)

    cls.write_bytes, cls.rename_dir, cls.delete_dir = write_bytes, rename_dir, delete_dir
    nc = NodeCommit(st)
    target = nc.node_target(sys.argv[3])
    nc.commit(target, sys.argv[3], b'{"v": "new"}', overwrite=True)
''')


def _write(d: Path, tag: str, manifest: bool) -> None:
    (d / "arrays").mkdir(parents=True)
    (d / "arrays" / "a.bin").write_bytes(tag.encode() * 4096)
    if manifest:
        (d / "manifest.json").write_bytes(b'{"v": "%s"}' % tag.encode())


@pytest.mark.parametrize("point", ["manifest", "rename1", "rename2", "trash", "none"])
def test_sigkill_during_a_nodes_commit_leaves_the_old_step_or_the_new_one_whole(tmp_path, point):
    root = tmp_path / "node"
    _write(root / NAME, "old", manifest=True)
    _write(root / f".tmp-{NAME}-0123abcd", "new", manifest=False)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(root), point, NAME], env=env, capture_output=True,
                          timeout=120)
    assert proc.returncode == (0 if point == "none" else -9), proc.stderr.decode()
    NodeCommit(open_storage(os.fspath(root))).recover()
    step = root / NAME
    tag = (step / "manifest.json").read_bytes()
    assert tag in (b'{"v": "old"}', b'{"v": "new"}')
    v = tag.decode().split('"')[3]
    assert (step / "arrays" / "a.bin").read_bytes() == v.encode() * 4096  # the manifest's own files
    assert v == ("new" if point in ("trash", "none") else "old")


def test_a_node_target_is_the_newest_write_of_the_step_or_a_new_empty_one(tmp_path):
    st = open_storage(os.fspath(tmp_path))
    nc = NodeCommit(st)
    empty = nc.node_target(NAME)  # this node's ranks wrote nothing
    assert (tmp_path / empty.dir).is_dir() and not any((tmp_path / empty.dir).iterdir())
    older, newer = tmp_path / f".tmp-{NAME}-aaaa", tmp_path / f".tmp-{NAME}-bbbb"
    older.mkdir()
    newer.mkdir()
    os.utime(older, (1, 1))
    os.utime(tmp_path / empty.dir, (2, 2))
    assert nc.node_target(NAME).dir == newer.name
    assert not older.exists() and not (tmp_path / empty.dir).exists()
    nc.commit(nc.node_target(NAME), NAME, b"{}", overwrite=True)
    assert (tmp_path / NAME / "manifest.json").read_bytes() == b"{}"
