"""The ``ckpt`` command on real checkpoints (local disk, memory://, S3 on a local server).

A few tests run the real entry point (``python -m ckpt``) in a subprocess; the rest
call ``main([...])`` in-process and read its output with capsys, which is the same code
without the interpreter start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt._cli.main import main
from ckpt.errors import CorruptCheckpointError
from tests._helpers import assert_same_module, assert_same_optimizer, mlp, same_bits

SMALL = ckpt.SaveOptions(pool_bytes=8 << 20, max_shard_bytes=1 << 20, chunk_bytes=64 << 10)
W_SHAPE = (1024, 400)  # float32, 1.6 MB: 2 shards of 512 rows, each of 16 chunks of 32 rows


def _model(seed: int) -> torch.nn.Module:
    return mlp(seed, 256, 512, 8)


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"model": _model(seed), "w": torch.randn(W_SHAPE, generator=g), "meta": {"epoch": seed}}


def _save(state: dict[str, Any], url: str, step: int) -> None:
    snap = ckpt.Snapshotter(SMALL)
    try:
        snap.save_async(state, url, step=step).result()
    finally:
        snap.close()


def _assert_loads_equal(url: str, want: dict[str, Any]) -> None:
    got = {"model": _model(999), "w": torch.zeros(W_SHAPE), "meta": None}
    ckpt.load(got, url)
    assert_same_module(got["model"], want["model"])
    assert same_bits(got["w"], want["w"])
    assert got["meta"] == want["meta"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, Any]]]:
    """A run with two committed checkpoints (steps 100 and 200). Tests must not modify it."""
    root = tmp_path_factory.mktemp("cli") / "run"
    states = {}
    for step in (100, 200):
        states[step] = _state(step)
        _save(states[step], str(root / f"step-{step:09d}"), step)
    return root, states


@pytest.fixture
def scratch(run: tuple[Path, dict], tmp_path: Path) -> tuple[Path, dict[int, dict[str, Any]]]:
    """A private copy of the run that a test may damage."""
    root, states = run
    dst = tmp_path / "run"
    shutil.copytree(root, dst)
    return dst, states


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _proc(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "ckpt", *argv], capture_output=True, text=True, env=env,
                          timeout=120)


def _manifest(ckpt_dir: Path) -> dict[str, Any]:
    return json.loads((ckpt_dir / "manifest.json").read_text())


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


# -- ls / info ---------------------------------------------------------------------
def test_ls_entry_point(run: tuple[Path, dict]) -> None:
    root, _ = run
    p = _proc("ls", str(root))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split()[:4] == ["STEP", "NAME", "CREATED", "SIZE"]
    assert [ln.split()[1] for ln in lines[1:]] == ["step-000000200", "step-000000100"]  # newest first
    assert all("committed" in ln for ln in lines[1:])
    assert p.stderr == ""


def test_ls_all_shows_incomplete_with_reason(scratch: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = scratch
    broken = root / "step-000000300"
    shutil.copytree(root / "step-000000200", broken)
    (broken / "manifest.json").unlink()  # a save that never committed
    code, out, _ = _cli(capsys, "ls", str(root))
    assert code == 0 and "step-000000300" not in out
    code, out, _ = _cli(capsys, "ls", str(root), "--all")
    assert code == 0
    row = next(ln for ln in out.splitlines() if "step-000000300" in ln)
    assert "incomplete" in row and "no manifest.json" in row
    code, out, _ = _cli(capsys, "ls", str(root), "--all", "--json")
    rows = json.loads(out)
    assert [r["step"] for r in rows] == [300, 200, 100]
    assert rows[0]["committed"] is False and "never committed" in rows[0]["reason"]
    assert rows[1]["committed"] is True and rows[1]["world_size"] == 1 and rows[1]["size"] > 400 * 1024
    assert rows[1]["size"] == sum(f.stat().st_size for f in (root / "step-000000200").rglob("*") if f.is_file())


def test_info_json(run: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = run
    code, out, _ = _cli(capsys, "info", str(root / "step-000000200"), "--json")
    assert code == 0
    d = json.loads(out)
    assert d["step"] == 200 and d["world_size"] == 1 and d["versions"]["torch"] == torch.__version__
    e = {x["key"]: x for x in d["entries"]}
    assert e["w"]["shape"] == list(W_SHAPE) and e["w"]["dtype"] == "float32" and e["w"]["nbytes"] == 1024 * 400 * 4
    assert e["w"]["layout"]["type"] == "array" and e["w"]["layout"]["shards"] == 2
    assert e["model/2.bias"]["layout"]["type"] == "packed"
    assert e["meta"]["kind"] == "json"
    assert d["totals"]["tensors"] == 5 and d["totals"]["tensor_bytes"] == sum(
        x["nbytes"] for x in d["entries"] if x["kind"] == "tensor")


def test_info_text_is_a_table(run: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = run
    code, out, _ = _cli(capsys, "info", str(root / "step-000000100"))
    assert code == 0
    assert "step        100" in out
    header = next(ln for ln in out.splitlines() if ln.startswith("KEY"))
    w_row = next(ln for ln in out.splitlines() if ln.startswith("w "))
    assert w_row.index("float32") == header.index("DTYPE")  # aligned columns
    assert "1024x400" in w_row and "1.6 MiB" in w_row and "2 shards of 512x400" in w_row


# -- verify --------------------------------------------------------------------------
def test_verify_ok_entry_point(run: tuple[Path, dict]) -> None:
    root, _ = run
    p = _proc("verify", str(root / "step-000000200"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("OK ")


def test_verify_names_every_corrupt_chunk(scratch: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = scratch
    ck = root / "step-000000200"
    m = _manifest(ck)
    w_path = m["entries"]["w"]["storage"]["path"]
    chunk = 32 * 400 * 4 + 4  # bytes of one stored inner chunk (data + crc32c)
    _flip(ck / w_path / "c.1.0", 2 * chunk + 10)  # shard 1, its third chunk: global chunk (18, 0)
    big = m["entries"]["model/0.weight"]["storage"]["path"]
    _flip(ck / big / "c.0.0", 5)  # another tensor: verify keeps going
    code, out, _ = _cli(capsys, "verify", str(ck))
    assert code == 1
    bad = [ln for ln in out.splitlines() if ln.startswith("CORRUPT")]
    assert len(bad) == 2
    w_line = next(ln for ln in bad if " w " in ln)
    assert f"{w_path}/c.1.0" in w_line and "chunk (18, 0)" in w_line and "[576:608, 0:400]" in w_line
    assert any("model/0.weight" in ln for ln in bad)
    assert "2 problems" in out.splitlines()[-1]

    code, out, _ = _cli(capsys, "verify", str(ck), "--json")
    assert code == 1
    rep = json.loads(out)
    assert rep["ok"] is False
    p = next(x for x in rep["problems"] if x["keys"] == ["w"])
    assert p["what"] == "corrupt" and p["shard"] == [1, 0] and p["chunk"] == [18, 0]
    assert p["path"] == f"{w_path}/c.1.0"


def test_verify_deleted_and_truncated_objects(scratch: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = scratch
    ck = root / "step-000000200"
    m = _manifest(ck)
    w_path = m["entries"]["w"]["storage"]["path"]
    (ck / w_path / "c.1.0").unlink()
    pack = ck / m["entries"]["model/0.bias"]["storage"]["path"] / "c.0"
    pack.write_bytes(pack.read_bytes()[:-100])
    for extra in ([], ["--quick"]):
        code, out, _ = _cli(capsys, "verify", str(ck), "--json", *extra)
        assert code == 1
        probs = json.loads(out)["problems"]
        missing = [p for p in probs if p["what"] == "missing"]
        assert len(missing) == 1 and missing[0]["keys"] == ["w"] and missing[0]["path"] == f"{w_path}/c.1.0"
        short = [p for p in probs if p["what"] == "size"]
        assert len(short) == 1 and "model/0.bias" in short[0]["keys"]


def test_deleted_shard_of_zeros_is_detected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: all-zero chunks used to be skipped on write, so a deleted object read
    back as zeros with no error. Now every chunk is stored and a missing one is an error."""
    url = tmp_path / "step-000000001"
    _save({"z": torch.zeros(W_SHAPE)}, str(url), 1)
    path = _manifest(url)["entries"]["z"]["storage"]["path"]
    assert sorted(p.name for p in (url / path).glob("c.*")) == ["c.0.0", "c.1.0"]  # every shard of zeros is stored
    (url / path / "c.1.0").unlink()
    with pytest.raises(CorruptCheckpointError, match="missing"):
        ckpt.load({"z": torch.ones(W_SHAPE)}, str(url))
    code, out, _ = _cli(capsys, "verify", str(url), "--quick")
    assert code == 1 and "MISSING" in out and f"{path}/c.1.0" in out


def test_verify_missing_pickled_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = tmp_path / "step-000000001"
    ckpt.save({"obj": uuid.UUID(int=1), "w": torch.ones(3)}, str(url), allow_pickle=True)
    assert _cli(capsys, "verify", str(url))[0] == 0
    path = _manifest(url)["entries"]["obj"]["path"]
    (url / path).unlink()
    code, out, _ = _cli(capsys, "verify", str(url), "--json")
    assert code == 1
    (p,) = json.loads(out)["problems"]
    assert p["what"] == "missing" and p["keys"] == ["obj"] and p["path"] == path


# -- cp ------------------------------------------------------------------------------
def test_cp_local_and_memory_round_trip(run: tuple[Path, dict], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    root, states = run
    src = str(root / "step-000000200")
    code, out, _ = _cli(capsys, "cp", src, str(tmp_path / "copy") + "/")  # into a run, same name
    assert code == 0 and "verified" in out
    local = tmp_path / "copy" / "step-000000200"
    assert not [p for p in (tmp_path / "copy").iterdir() if p.name.startswith(".tmp-")]
    _assert_loads_equal(str(local), states[200])

    mem = f"memory://cli-{uuid.uuid4().hex[:8]}/run/step-000000200"
    code, _, _ = _cli(capsys, "cp", str(local), mem)
    assert code == 0
    _assert_loads_equal(mem, states[200])
    back = tmp_path / "back" / "step-000000200"
    code, _, _ = _cli(capsys, "cp", mem, str(back), "--json")
    assert code == 0
    _assert_loads_equal(str(back), states[200])
    code, out, _ = _cli(capsys, "verify", str(back))
    assert code == 0


def test_cp_refuses_an_existing_destination(run: tuple[Path, dict], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    root, states = run
    dst = tmp_path / "r" / "step-000000100"
    code, out, _ = _cli(capsys, "cp", str(root / "step-000000100"), str(dst), "--dry-run", "--json")
    assert code == 0 and json.loads(out)["dry_run"] is True and not dst.exists()
    assert _cli(capsys, "cp", str(root / "step-000000100"), str(dst))[0] == 0
    code, _, err = _cli(capsys, "cp", str(root / "step-000000200"), str(dst))
    assert code == 1
    assert err.startswith("ckpt: error: ") and "already exists" in err and len(err.strip().splitlines()) == 1
    _assert_loads_equal(str(dst), states[100])  # untouched
    assert _cli(capsys, "cp", str(root / "step-000000200"), str(dst), "--overwrite")[0] == 0
    _assert_loads_equal(str(dst), states[200])


@pytest.mark.s3
def test_cp_to_s3_and_back(run: tuple[Path, dict], tmp_path: Path, s3_url: str, s3_options: dict[str, Any],
                           capsys: pytest.CaptureFixture[str]) -> None:
    root, states = run
    opts = [f"--storage-option={k}={v}" for k, v in s3_options.items()]
    remote = f"{s3_url}/run/step-000000200"
    assert _cli(capsys, "cp", str(root / "step-000000200"), remote, *opts)[0] == 0
    code, out, _ = _cli(capsys, *opts, "ls", f"{s3_url}/run", "--json")  # options before the command too
    assert code == 0 and [r["name"] for r in json.loads(out)] == ["step-000000200"]
    assert _cli(capsys, "verify", remote, *opts)[0] == 0
    back = tmp_path / "back" / "step-000000200"
    assert _cli(capsys, "cp", remote, str(back), *opts)[0] == 0
    _assert_loads_equal(str(back), states[200])


# -- gc ------------------------------------------------------------------------------
def test_gc_removes_debris_and_applies_retention(scratch: tuple[Path, dict],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root, states = scratch
    tmp = root / ".tmp-step-000000300-0123456789ab"
    shutil.copytree(root / "step-000000200", tmp)
    uncommitted = root / "step-000000400"
    shutil.copytree(root / "step-000000200", uncommitted)
    (uncommitted / "manifest.json").unlink()
    other = root / "notes"
    other.mkdir()  # not ckpt's: never touched
    before = sorted(p.name for p in root.iterdir())

    code, out, _ = _cli(capsys, "gc", str(root))  # default grace: both may be saves in progress
    assert code == 0 and "removed 0 directories" in out and "grace" in out
    code, out, _ = _cli(capsys, "gc", str(root), "--grace", "0", "--keep-last", "1", "--dry-run")
    assert code == 0 and "would remove" in out
    assert sorted(p.name for p in root.iterdir()) == before

    code, out, _ = _cli(capsys, "gc", str(root), "--grace", "0", "--json")
    assert code == 0
    removed = {x["name"] for x in json.loads(out)["removed"]}
    assert removed == {tmp.name, uncommitted.name}
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step-000000100", "step-000000200"]

    code, out, _ = _cli(capsys, "gc", str(root), "--keep-last", "1")
    assert code == 0 and "step-000000100" in out
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step-000000200"]
    _assert_loads_equal(str(root / "step-000000200"), states[200])


# -- export / import -----------------------------------------------------------------
def test_export_safetensors(run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    root, states = run
    ck = str(root / "step-000000200")
    code, out, _ = _cli(capsys, "export", ck, str(tmp_path / "one.safetensors"), "--only", "model")
    assert code == 0
    got = load_file(str(tmp_path / "one.safetensors"))
    want = states[200]["model"].state_dict()
    assert sorted(got) == sorted(want)  # "model/0.weight" -> "0.weight"
    assert all(torch.equal(got[k], want[k]) for k in want)

    code, out, _ = _cli(capsys, "export", ck, str(tmp_path / "sharded"), "--max-shard-size", "300KiB")
    assert code == 0 and "skipped 1 non-tensor entries: meta" in out
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    merged: dict[str, torch.Tensor] = {}
    for f in files:
        merged.update(load_file(str(tmp_path / "sharded" / f)))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    assert torch.equal(merged["w"], states[200]["w"])
    assert torch.equal(merged["model/2.weight"], want["2.weight"])


def test_export_torch(run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, states = run
    out_file = tmp_path / "model.pt"
    code, _, _ = _cli(capsys, "export", str(root / "step-000000100"), str(out_file), "--format", "torch",
                      "--only", "model")
    assert code == 0
    sd = torch.load(out_file, weights_only=True)
    m = _model(5)
    m.load_state_dict(sd)
    assert_same_module(m, states[100]["model"])


def test_import_dcp(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    model = _model(3)
    sd = {"model": model.state_dict(), "step": 7}
    with pytest.warns(UserWarning):  # no process group: DCP says it saves in a single process
        dcp.save(sd, checkpoint_id=str(tmp_path / "dcp"))
    dst = tmp_path / "run" / "step-000000007"
    p = _proc("import", str(tmp_path / "dcp"), str(dst), "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["format"] == "dcp" and r["tensors"] == 4 and r["values"] == 1
    got = {"model": _model(11), "step": None}
    ckpt.load(got, str(dst))
    assert got["step"] == 7
    assert_same_module(got["model"], model)
    assert ckpt.read_manifest(str(dst)).step == 7


def test_import_torch_save_and_safetensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    model = _model(4)
    torch.save({"model": model.state_dict(), "epoch": 2}, tmp_path / "full.pt")
    code, out, _ = _cli(capsys, "import", str(tmp_path / "full.pt"), str(tmp_path / "a"), "--step", "5")
    assert code == 0 and "(torch)" in out
    got = {"model": _model(12), "epoch": None}
    ckpt.load(got, str(tmp_path / "a" / "step-000000005"))
    assert got["epoch"] == 2
    assert_same_module(got["model"], model)

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    dst = tmp_path / "b" / "step-000000001"
    code, out, _ = _cli(capsys, "import", str(tmp_path / "m.safetensors"), str(dst), "--prefix", "model")
    assert code == 0 and "(safetensors)" in out
    got = {"model": _model(13)}
    ckpt.load(got, str(dst))
    assert_same_module(got["model"], model)


@pytest.mark.parametrize("how", ["dcp-by-name", "dcp-by-index", "torch-by-index"])
def test_import_dcp_model_and_optimizer_loads_into_live_ones(tmp_path: Path, how: str) -> None:
    """The way DCP users save (torchtitan, accelerate): get_state_dict's name-keyed
    optimizer state next to the model's; or the optimizer's own index-keyed state dict
    (DCP or torch.save). Imported, it loads into a live model AND its optimizer,
    bit-exact (by name, or by position as torch does), and training goes on from there."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    def trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        o = torch.optim.AdamW(m.parameters(), lr=0.01)
        for _ in range(2):
            m(torch.randn(4, 6)).square().sum().backward()
            o.step()
            o.zero_grad()
        return m, o

    model, optim = trained(0)
    msd, osd = get_state_dict(model, optim) if how == "dcp-by-name" else (model.state_dict(), optim.state_dict())
    src = tmp_path / ("src.pt" if how.startswith("torch") else "dcp")
    if how.startswith("torch"):
        torch.save({"model": msd, "optim": osd}, src)
    else:
        with pytest.warns(UserWarning):  # no process group: a single-process save
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(src))
    dst = tmp_path / "run" / "step-000000002"
    p = _proc("import", str(src), str(dst), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["tensors"] == 4 + 4 * 3  # 4 parameters, step/exp_avg/exp_avg_sq each
    m2, o2 = trained(1)
    ckpt.load({"model": m2, "optim": o2}, str(dst))
    assert_same_module(m2, model)
    assert_same_optimizer(o2, optim)  # step, exp_avg, exp_avg_sq of each parameter; param_groups
    x = torch.randn(4, 6)
    for m, o in ((model, optim), (m2, o2)):  # one more step each: still the same
        m(x).square().sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m2.parameters()))


def test_import_honours_a_safetensors_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Hugging Face folder of sharded weights: only the files (and names) its
    model.safetensors.index.json lists are imported, from the folder or from the index
    file itself; a consolidated copy beside them is not merged in."""
    from safetensors.torch import save_file

    model = _model(4)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(sd)
    src = tmp_path / "hf"
    src.mkdir()
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, ns in shards.items():
        save_file({n: sd[n] for n in ns}, str(src / file))
    index = {"metadata": {}, "weight_map": {n: f for f, ns in shards.items() for n in ns}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"stray.weight": torch.ones(3)}, str(src / "consolidated.safetensors"))
    for i, arg in enumerate([src, src / "model.safetensors.index.json"]):
        dst = tmp_path / f"out{i}" / "step-000000001"
        code, out, err = _cli(capsys, "import", str(arg), str(dst), "--prefix", "model")
        assert code == 0 and "(safetensors)" in out, err
        keys = set(ckpt.read_manifest(str(dst)).entries)
        assert not any("stray" in k for k in keys)
        got = {"model": _model(13)}
        ckpt.load(got, str(dst))
        assert all(torch.equal(sd[n], got["model"].state_dict()[n]) for n in names)
    (src / "model-00002-of-00002.safetensors").unlink()  # a shard the index lists is missing
    code, _, err = _cli(capsys, "import", str(src), str(tmp_path / "bad" / "step-000000001"))
    assert code == 1 and "model-00002-of-00002.safetensors" in err and "--allow-pickle" not in err


def test_load_of_a_dcp_directory_says_to_import_it(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(tmp_path / "dcp"))
    with pytest.raises(ckpt.errors.CheckpointNotFoundError, match="DCP") as ei:
        ckpt.load({"w": torch.zeros(3)}, str(tmp_path / "dcp"))
    assert "ckpt import" in str(ei.value)


def test_import_refuses_pickles_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch.distributed.checkpoint as dcp

    sd = {"w": torch.ones(3), "obj": uuid.UUID(int=5)}
    torch.save(sd, tmp_path / "x.pt")
    with pytest.warns(UserWarning):
        dcp.save(sd, checkpoint_id=str(tmp_path / "dcp"))
    for src in ("x.pt", "dcp"):
        dst = tmp_path / src.replace(".", "_") / "step-000000001"
        code, _, err = _cli(capsys, "import", str(tmp_path / src), str(dst))
        assert code == 1 and "--allow-pickle" in err and "uuid.UUID" in err
        assert len(err.strip().splitlines()) == 1 and not dst.exists()
        code, _, _ = _cli(capsys, "import", str(tmp_path / src), str(dst), "--allow-pickle")
        assert code == 0
        got = {"w": torch.zeros(3), "obj": None}
        ckpt.load(got, str(dst), allow_pickle=True)
        assert got["obj"] == uuid.UUID(int=5) and torch.equal(got["w"], torch.ones(3))


# -- usage ---------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["ls"],
    ["verify"],
    ["gc", "run", "--keep-last", "0"],
    ["gc", "run", "--grace", "-1"],
    ["ls", "run", "--storage-option", "novalue"],
    ["export", "c", "o", "--format", "onnx"],
    ["export", "c", "o", "--max-shard-size", "lots"],
    ["import", "a", "b", "--format", "zip"],
    ["reshard", "a", "b"],
    ["ls", "gopher://host/run"],
])
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, *argv)
    assert code == 2
    assert err  # says what is wrong


def test_errors_are_one_line_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, "info", str(tmp_path / "nothing" / "step-000000001"))
    assert code == 1 and out == ""
    assert err.startswith("ckpt: error: ") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_help_documents_exit_codes() -> None:
    p = _proc("--help")
    assert p.returncode == 0
    assert "exit codes" in p.stdout and "2  bad usage" in p.stdout
    for cmd in ("ls", "info", "verify", "cp", "gc", "export", "import", "reshard"):
        assert cmd in p.stdout


def test_imported_leaves_are_never_loaded_into() -> None:
    """The provider `ckpt import` saves through holds ready-made leaves: loading into it is
    a typed error, not a silent no-op."""
    from ckpt.errors import UnsupportedStateError
    from ckpt.providers import Leaves

    with pytest.raises(UnsupportedStateError, match="only saved"):
        Leaves([("w", torch.zeros(2))]).load(None)
