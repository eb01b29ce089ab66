"""Issue #36, cases 2 and 3: sizes and offsets a hostile manifest implies are bounded
before anything is allocated or read (every reader, under a memory limit: no abort, only
typed ckpt errors), and no reader reads through a symlink inside a checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest

import ckpt
from ckpt import tools
from ckpt._engine._layout import shard_image
from ckpt._engine._plan import ArrayLayout
from ckpt.errors import CheckpointError, CorruptCheckpointError, UnsafePathError
from tests.reliability import blank_state, make_state, sign_manifest
from tests.reliability._readers import READERS, in_child

LIMIT = 3 << 30  # address space of the child: well below what the hostile manifests ask for


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    url = tmp_path_factory.mktemp("sizes") / "good"
    ckpt.save(make_state(1, rows=256), str(url), step=1)
    return url


def _variant(good, tmp_path, name, edit):
    dst = tmp_path / name
    shutil.copytree(good, dst)
    body = json.loads((dst / "manifest.json").read_text())
    edit(body, dst)
    (dst / "manifest.json").write_bytes(sign_manifest(body))
    return str(dst)


def _far_pack(body, _dst):
    body["entries"]["b"]["storage"]["offset"] = 2**36  # 8 bytes... at 64 GiB


def _near_pack(body, _dst):
    body["entries"]["b"]["storage"]["offset"] = 2**27  # within the limits, past the real object


def _huge_chunk(body, dst):
    """"w" as one 2**36-byte chunk, its shard a sparse file of exactly the implied size."""
    n = 2**34  # float32
    e = body["entries"]["w"]
    e["shape"] = [n]
    e["storage"]["shard_shape"] = [n]
    e["storage"]["chunk_shape"] = [n]
    adir = dst / e["storage"]["path"]
    shutil.rmtree(adir)
    adir.mkdir(parents=True)
    img = shard_image(e["storage"]["path"], ArrayLayout(e["storage"]["path"], (n,), (n,), (n,), "."),
                      ((0,), (n,)), 4)
    with open(dst / img.file, "wb") as f:
        f.truncate(img.nbytes)


CASES = {"far_pack": _far_pack, "near_pack": _near_pack, "huge_chunk": _huge_chunk}


def test_every_reader_under_a_memory_limit_gives_typed_errors(good, tmp_path):
    urls = [_variant(good, tmp_path, name, edit) for name, edit in CASES.items()]
    rc, results, tail = in_child(urls, LIMIT)
    assert rc == 0 and results is not None, f"the readers' process died (rc {rc}):\n{tail}"
    for name, res in zip(CASES, results):
        assert set(res) == set(READERS)
        for reader, what in res.items():
            # verify reports a bad manifest or object as a problem, and returns; info reads the manifest only
            assert what.startswith("typed:") or (reader in ("verify", "info") and what == "ok"), (name, reader, what)


def test_a_pack_past_its_object_names_key_and_object(good, tmp_path):
    url = _variant(good, tmp_path, "near", _near_pack)
    with pytest.raises(CorruptCheckpointError) as ei:
        ckpt.load(blank_state(256), url)
    assert "b" in (ei.value.key or "") and "packs/" in (ei.value.path or "")
    report = tools.verify(url)
    assert not report.ok


def test_verify_reports_absurd_chunks(good, tmp_path):
    report = tools.verify(_variant(good, tmp_path, "huge", _huge_chunk))
    assert [p.what for p in report.problems] == ["manifest"]
    assert "chunk" in report.problems[0].message


# -- case 3: symlinks ----------------------------------------------------------------
@pytest.fixture
def outside(tmp_path):
    p = tmp_path / "secret"
    p.write_bytes(b"outside the checkpoint" * 100)
    return p


def _link_shard(good, tmp_path, outside):
    dst = tmp_path / "linked"
    shutil.copytree(good, dst)
    shard = dst / "arrays" / "w.zarr" / "c.0.0"
    size = shard.stat().st_size
    outside.write_bytes(shard.read_bytes()[:size])  # same bytes: only the link gives it away
    shard.unlink()
    shard.symlink_to(outside)
    return dst


def test_cp_refuses_a_symlinked_shard(good, tmp_path, outside):
    src = _link_shard(good, tmp_path, outside)
    with pytest.raises(UnsafePathError) as ei:
        tools.cp(str(src), str(tmp_path / "copy"))
    assert "c.0.0" in ei.value.path
    assert not (tmp_path / "copy").exists()


@pytest.mark.parametrize("reader", ["load", "verify", "export", "reshard", "cp"])
def test_every_reader_refuses_a_symlinked_shard(good, tmp_path, outside, reader):
    src = str(_link_shard(good, tmp_path, outside))
    calls = {
        "load": lambda: ckpt.load(blank_state(256), src),
        "verify": lambda: tools.verify(src),
        "export": lambda: tools.export(src, str(tmp_path / "out"), format="torch"),
        "reshard": lambda: tools.reshard(src, str(tmp_path / "re"), 2),
        "cp": lambda: tools.cp(src, str(tmp_path / "copy")),
    }
    with pytest.raises(UnsafePathError):
        calls[reader]()


@pytest.mark.parametrize("reader", ["load", "verify", "info", "export", "reshard", "cp"])
def test_a_symlinked_manifest_is_refused(good, tmp_path, reader):
    real = tmp_path / "elsewhere.json"
    dst = tmp_path / "ck"
    shutil.copytree(good, dst)
    shutil.move(dst / "manifest.json", real)
    (dst / "manifest.json").symlink_to(real)
    src = str(dst)
    calls = {
        "load": lambda: ckpt.load(blank_state(256), src),
        "verify": lambda: tools.verify(src),
        "info": lambda: tools.info(src),
        "export": lambda: tools.export(src, str(tmp_path / "out"), format="torch"),
        "reshard": lambda: tools.reshard(src, str(tmp_path / "re"), 2),
        "cp": lambda: tools.cp(src, str(tmp_path / "copy")),
    }
    with pytest.raises(UnsafePathError) as ei:
        calls[reader]()
    assert ei.value.path.endswith("manifest.json")


def test_import_refuses_a_symlink_inside_a_dcp_directory(tmp_path, outside):
    import torch
    import torch.distributed.checkpoint as dcp

    src = tmp_path / "dcp"
    dcp.save({"w": torch.arange(10.0)}, checkpoint_id=str(src), no_dist=True)
    data = next(p for p in src.iterdir() if p.suffix == ".distcp")
    outside.write_bytes(data.read_bytes())
    data.unlink()
    data.symlink_to(outside)
    with pytest.raises(UnsafePathError):
        tools.import_(str(src), str(tmp_path / "run" / "step-000000000"))


def test_gc_removes_a_link_never_its_target(tmp_path, outside):
    run = tmp_path / "run"
    debris = run / ".tmp-step-000000001-abc"
    debris.mkdir(parents=True)
    (debris / "link").symlink_to(outside)
    (debris / "dirlink").symlink_to(outside.parent, target_is_directory=True)
    tools.gc(str(run), grace=0)
    assert not debris.exists() and outside.exists()


def test_errors_are_ckpt_errors():
    assert issubclass(UnsafePathError, CheckpointError)
