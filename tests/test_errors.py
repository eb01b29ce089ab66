"""Bad inputs raise typed, actionable errors and never damage a committed checkpoint.

Every case checks (DESIGN.md, "Rules every part keeps"):

* the precise ckpt error class, which is also a CheckpointError and the fitting builtin;
* a message that names the key and/or the path and says what to do ("fix: ...");
* where a committed checkpoint exists, that its bytes are unchanged and it still loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt import errors as E
from tests._helpers import assert_same_module, assert_same_state_dict

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def canonical(body: dict[str, Any]) -> bytes:
    """Mirror of ckpt._format._canonical: the bytes the manifest checksum covers."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def rewrite_manifest(ckpt_dir: Path, mutate, *, fix_checksum: bool = True) -> None:
    """Edit manifest.json in place; recompute its checksum unless asked not to."""
    p = ckpt_dir / "manifest.json"
    body = json.loads(p.read_bytes())
    mutate(body)
    if fix_checksum:
        body.pop("checksum", None)
        body["checksum"] = "sha256:" + hashlib.sha256(canonical(body)).hexdigest()
    p.write_bytes(json.dumps(body, indent=1, sort_keys=True).encode())


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = Path(dirpath) / name
            out[full.relative_to(root).as_posix()] = full.read_bytes()
    return out


def files_outside(root: Path, inside: Path) -> list[str]:
    """Files under ``root`` that do not lie under ``inside``."""
    inside = inside.resolve()
    bad = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = (Path(dirpath) / name).resolve()
            if inside not in full.parents:
                bad.append(str(full))
    return bad


def check(exc: BaseException, cls: type, builtin: type, *, key: str | None = None,
          path: Any = None, hint: str | None = None, text: str | None = None) -> str:
    """The error is exactly ``cls``, also a CheckpointError and ``builtin``, and its
    message names the key / path and carries a fix."""
    assert type(exc) is cls, f"expected {cls.__name__}, got {type(exc).__name__}: {exc}"
    assert isinstance(exc, E.CheckpointError)
    assert isinstance(exc, builtin), f"{cls.__name__} is not a {builtin.__name__}"
    msg = str(exc)
    if key is not None:
        assert exc.key == key, (exc.key, key)
        assert repr(key) in msg, msg
    if path is not None:
        assert exc.path is not None and str(path) in exc.path, (exc.path, path)
        assert str(path) in msg, msg
    assert exc.key is not None or exc.path is not None or key is None and path is None
    assert exc.hint, f"no fix hint: {msg}"
    assert "fix: " in msg, msg
    if hint is not None:
        assert hint in exc.hint, exc.hint
    if text is not None:
        assert text in msg, msg
    return msg


def make_model(seed: int = 0, out: int = 3, bias: bool = True, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, out, bias=bias), torch.nn.ReLU(),
                               torch.nn.Linear(out, 2)).to(dtype)


def make_state(seed: int = 0, **kw: Any) -> dict[str, Any]:
    m = make_model(seed, **kw)
    o = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.randn(5, 4, dtype=m[0].weight.dtype)).sum().backward()
    o.step()
    o.zero_grad()
    return {"model": m, "optim": o, "step": 7}


def assert_loads_equal(url: Any, ref: dict[str, Any]) -> None:
    """The checkpoint loads into a fresh state and reproduces ``ref``'s tensors."""
    fresh = make_state(seed=123)
    ckpt.load(fresh, url)
    assert_same_module(fresh["model"], ref["model"])
    assert_same_state_dict(fresh["optim"].state_dict()["state"], ref["optim"].state_dict()["state"], "optim")
    assert fresh["step"] == ref["step"]


@pytest.fixture
def committed(tmp_path: Path):
    """A committed checkpoint: (its directory, the state saved, its bytes)."""
    state = make_state(seed=0)
    d = tmp_path / "run" / "step-000000007"
    ckpt.save(state, d, step=7)
    assert (d / "manifest.json").is_file()
    return d, state, snapshot(d)


def assert_untouched(committed) -> None:
    d, state, before = committed
    assert snapshot(d) == before, "the committed checkpoint's files changed"
    assert_loads_equal(d, state)


# ---------------------------------------------------------------------------
# keys, shapes and dtypes on load
# ---------------------------------------------------------------------------


def test_missing_key_on_load(committed):
    d, state, _ = committed
    target = make_state(seed=1)
    extra = torch.nn.Parameter(torch.full((3,), 5.0))
    target["model"][0].register_parameter("scale", extra)
    with pytest.raises(E.MissingKeyError) as ei:
        ckpt.load(target, d)
    check(ei.value, E.MissingKeyError, KeyError, key="model/0.scale", path=d, hint="allow_missing=True")
    # non-strict: everything else loads, the extra parameter is left as it is
    ckpt.load(target, d, strict=False)
    assert torch.equal(target["model"][0].weight, state["model"][0].weight)
    assert torch.equal(extra, torch.full((3,), 5.0))
    assert_untouched(committed)


def test_missing_top_level_tensor(committed):
    d, _, _ = committed
    target = make_state(seed=1)
    target["ema"] = torch.zeros(3)
    with pytest.raises(E.MissingKeyError) as ei:
        ckpt.load(target, d)
    check(ei.value, E.MissingKeyError, KeyError, key="ema", path=d)
    assert_untouched(committed)


def test_unexpected_key_strict_and_non_strict(committed):
    d, state, _ = committed
    target = make_state(seed=1)
    # the checkpoint has model/0.bias; this model has no bias there
    target["model"][0] = torch.nn.Linear(4, 3, bias=False)
    with pytest.raises(E.UnexpectedKeyError) as ei:
        ckpt.load({"model": target["model"]}, d)
    msg = check(ei.value, E.UnexpectedKeyError, KeyError, path=d, hint="allow_unexpected=True")
    assert "['model/0.bias']" in msg  # the optimizer is not asked for: skipped, not unexpected
    # strict=False ignores the extra entries and loads the rest
    stats = ckpt.load({"model": target["model"]}, d, strict=False)
    assert stats.unexpected == ["model/0.bias"] and "optim" in stats.skipped
    assert torch.equal(target["model"][0].weight, state["model"][0].weight)
    assert torch.equal(target["model"][2].bias, state["model"][2].bias)
    assert_untouched(committed)


def test_shape_mismatch(committed):
    d, _, _ = committed
    target = make_state(seed=1, out=5)
    before = target["model"][0].weight.detach().clone()
    with pytest.raises(E.ShapeMismatchError) as ei:
        ckpt.load(target, d)
    msg = check(ei.value, E.ShapeMismatchError, ValueError, key="model/0.weight", path=d)
    assert "[3, 4]" in msg and "[5, 4]" in msg
    assert torch.equal(target["model"][0].weight, before)  # nothing half-loaded
    assert_untouched(committed)


def test_dtype_mismatch(committed):
    d, _, _ = committed
    target = make_state(seed=1, dtype=torch.float64)
    with pytest.raises(E.DtypeMismatchError) as ei:
        ckpt.load(target, d)
    msg = check(ei.value, E.DtypeMismatchError, TypeError, key="model/0.weight", path=d)
    assert "float32" in msg and "float64" in msg
    assert_untouched(committed)


def test_optimizer_over_other_parameters(committed):
    d, state, _ = committed
    m = make_model(seed=1)
    # the checkpoint's optimizer covered every parameter; this one only the first layer's
    o = torch.optim.AdamW(m[0].parameters(), lr=1e-2)
    with pytest.raises(E.UnexpectedKeyError) as ei:
        ckpt.load({"model": m, "optim": o, "step": 0}, d)
    msg = check(ei.value, E.UnexpectedKeyError, KeyError, key="optim/state/2.weight", path=d,
                hint="same parameters")
    assert "2.weight" in msg
    # without strict, the group still holds other parameters: a shape error, not silent garbage
    with pytest.raises(E.ShapeMismatchError) as ei:
        ckpt.load({"model": m, "optim": o, "step": 0}, d, strict=False)
    check(ei.value, E.ShapeMismatchError, ValueError, key="optim", path=d)
    assert_untouched(committed)


def test_failed_optimizer_load_leaves_optimizer_untouched(committed):
    d, _, _ = committed
    m = make_model(seed=1)
    o = torch.optim.AdamW(m[0].parameters(), lr=1e-2)
    with pytest.raises(E.ShapeMismatchError):
        ckpt.load({"model": m, "optim": o, "step": 0}, d, strict=False)
    assert o.state_dict()["state"] == {}


def test_load_into_meta_tensor(committed):
    d, _, _ = committed
    with torch.device("meta"):
        m = make_model(seed=1)
    with pytest.raises(E.UnsupportedStateError) as ei:
        ckpt.load({"model": m}, d, strict=False)
    check(ei.value, E.UnsupportedStateError, TypeError, key="model/0.weight", path=d, hint="to_empty")
    assert_untouched(committed)


# ---------------------------------------------------------------------------
# what is (not) a checkpoint
# ---------------------------------------------------------------------------


def test_directory_that_is_not_a_checkpoint(tmp_path: Path, committed):
    plain = tmp_path / "notes"
    plain.mkdir()
    (plain / "readme.txt").write_text("hello")
    with pytest.raises(E.CheckpointNotFoundError) as ei:
        ckpt.load(make_state(seed=1), plain)
    check(ei.value, E.CheckpointNotFoundError, FileNotFoundError, path=plain)
    # the run directory instead of one of its checkpoints
    run = committed[0].parent
    with pytest.raises(E.CheckpointNotFoundError) as ei:
        ckpt.load(make_state(seed=1), run)
    check(ei.value, E.CheckpointNotFoundError, FileNotFoundError, path=run, hint="step-")
    # a regular file (say, a torch.save output) is not a checkpoint either
    f = tmp_path / "model.pt"
    torch.save({"x": torch.ones(2)}, f)
    with pytest.raises(E.CheckpointNotFoundError) as ei:
        ckpt.load(make_state(seed=1), f)
    check(ei.value, E.CheckpointNotFoundError, FileNotFoundError, path=f)
    assert (plain / "readme.txt").read_text() == "hello"
    assert_untouched(committed)


def test_uncommitted_checkpoint(tmp_path: Path):
    state = make_state(seed=0)
    d = tmp_path / "run" / "step-000000001"
    ckpt.save(state, d)
    (d / "manifest.json").unlink()  # as if the commit never happened
    before = snapshot(d)
    assert before  # data is there
    with pytest.raises(E.IncompleteCheckpointError) as ei:
        ckpt.load(make_state(seed=1), d)
    msg = check(ei.value, E.IncompleteCheckpointError, FileNotFoundError, path=d)
    assert "manifest" in msg and "never committed" in msg
    assert snapshot(d) == before
    assert ckpt.list_checkpoints(tmp_path / "run") == []


def test_nonexistent_path(tmp_path: Path):
    d = tmp_path / "nope" / "step-000000001"
    with pytest.raises(E.CheckpointNotFoundError) as ei:
        ckpt.load(make_state(seed=1), d)
    check(ei.value, E.CheckpointNotFoundError, FileNotFoundError, path=d, hint="ckpt ls")
    with pytest.raises(FileNotFoundError):  # callers that do not know ckpt
        ckpt.read_manifest(d)
    assert not (tmp_path / "nope").exists()  # loading creates nothing


# ---------------------------------------------------------------------------
# damaged and hostile manifests
# ---------------------------------------------------------------------------


def test_checksum_helper_mirrors_the_format(committed):
    d, state, _ = committed
    rewrite_manifest(d, lambda body: None)  # same content, re-serialised, checksum recomputed
    assert_loads_equal(d, state)


def test_corrupt_manifest_invalid_json(committed):
    d, _, _ = committed
    p = d / "manifest.json"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])  # truncated
    before = snapshot(d)
    with pytest.raises(E.ManifestError) as ei:
        ckpt.load(make_state(seed=1), d)
    msg = check(ei.value, E.ManifestError, ValueError, path=d, hint="earlier")
    assert "not valid JSON" in msg
    assert snapshot(d) == before


def test_tampered_manifest_fails_checksum(committed):
    d, _, _ = committed

    def tamper(body):
        body["entries"]["step"]["value"] = 999

    rewrite_manifest(d, tamper, fix_checksum=False)
    before = snapshot(d)
    with pytest.raises(E.ManifestError) as ei:
        ckpt.load(make_state(seed=1), d)
    msg = check(ei.value, E.ManifestError, ValueError, path=d)
    assert "checksum" in msg
    assert snapshot(d) == before


def test_future_format_version(committed):
    d, _, _ = committed
    rewrite_manifest(d, lambda body: body.update(format_version=99))
    with pytest.raises(E.FormatVersionError) as ei:
        ckpt.load(make_state(seed=1), d)
    msg = check(ei.value, E.FormatVersionError, ValueError, path=d, hint="upgrade")
    assert isinstance(ei.value, E.ManifestError)
    assert "99" in msg and "newer" in msg


def _first_packed(body) -> str:
    return next(k for k, e in body["entries"].items() if e.get("storage", {}).get("layout") == "packed")


@pytest.mark.parametrize("bad", ["../../etc", "/etc/passwd", "packs/../../../etc", "file:///etc"])
def test_manifest_path_escaping_the_checkpoint(committed, monkeypatch, bad):
    d, _, _ = committed
    key = {}

    def mutate(body):
        key["k"] = _first_packed(body)
        body["entries"][key["k"]]["storage"]["path"] = bad

    rewrite_manifest(d, mutate)
    before = snapshot(d)
    # record every read: only the manifest may be read
    from ckpt.storage._file import FileStorage

    reads: list[str] = []
    orig_read = FileStorage.read_bytes
    monkeypatch.setattr(FileStorage, "read_bytes",
                        lambda self, p, *a, **k: reads.append(p) or orig_read(self, p, *a, **k))
    import tensorstore

    opened: list[Any] = []
    orig_open = tensorstore.open
    monkeypatch.setattr(tensorstore, "open", lambda spec, *a, **k: opened.append(spec) or orig_open(spec, *a, **k))
    with pytest.raises(E.UnsafePathError) as ei:
        ckpt.load(make_state(seed=1), d)
    msg = check(ei.value, E.UnsafePathError, ValueError, key=key["k"], path=d)
    assert bad in msg
    assert all(r.endswith("manifest.json") for r in reads), reads
    assert opened == []
    assert snapshot(d) == before


def test_manifest_array_path_escaping(tmp_path: Path):
    big = torch.arange(200_000, dtype=torch.float32)  # > pack threshold: its own zarr array
    d = tmp_path / "run" / "step-000000001"
    ckpt.save({"w": big}, d)
    body = json.loads((d / "manifest.json").read_bytes())
    assert body["entries"]["w"]["storage"]["layout"] == "array"
    rewrite_manifest(d, lambda b: b["entries"]["w"]["storage"].update(path="../../etc"))
    with pytest.raises(E.UnsafePathError) as ei:
        ckpt.load({"w": torch.zeros_like(big)}, d)
    check(ei.value, E.UnsafePathError, ValueError, key="w", path=d)


def test_manifest_pickle_path_escaping(tmp_path: Path):
    d = tmp_path / "run" / "step-000000001"
    ckpt.save({"cfg": {"obj": Opaque(3)}}, d, allow_pickle=True)
    rewrite_manifest(d, lambda b: b["entries"]["cfg/obj"].update(path="/etc/passwd"))
    with pytest.raises(E.UnsafePathError) as ei:
        ckpt.load({"cfg": None}, d, allow_pickle=True)
    check(ei.value, E.UnsafePathError, ValueError, key="cfg/obj", path=d)


@pytest.mark.parametrize("shape", [[1 << 30, 1 << 30, 1 << 10], [-1, 3], [3, "4"]])
def test_absurd_shape_in_manifest(committed, monkeypatch, shape):
    d, _, _ = committed
    key = {}

    def mutate(body):
        key["k"] = _first_packed(body)
        body["entries"][key["k"]]["shape"] = shape

    rewrite_manifest(d, mutate)
    target = make_state(seed=1)
    allocations: list[Any] = []
    orig_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocations.append(a) or orig_empty(*a, **k))
    with pytest.raises(E.ManifestError) as ei:
        ckpt.load(target, d)
    check(ei.value, E.ManifestError, ValueError, key=key["k"], path=d)
    assert allocations == []
    with pytest.raises(E.ManifestError):
        ckpt.read_manifest(d)


# ---------------------------------------------------------------------------
# URLs and optional dependencies
# ---------------------------------------------------------------------------


def test_unknown_url_scheme(committed):
    with pytest.raises(E.UnknownURLSchemeError) as ei:
        ckpt.save(make_state(seed=1), "foo://x")
    msg = check(ei.value, E.UnknownURLSchemeError, ValueError, path="foo://", hint="file://")
    assert "'foo'" in msg
    with pytest.raises(E.UnknownURLSchemeError) as ei:
        ckpt.load(make_state(seed=1), "foo://bucket/run/step-000000001")
    check(ei.value, E.UnknownURLSchemeError, ValueError, path="foo://bucket", hint="register_storage")
    assert_untouched(committed)


def test_missing_optional_dependency(monkeypatch, committed):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` now raises ImportError
    for mod in [m for m in sys.modules if m.startswith("ckpt.storage._s3")]:
        monkeypatch.delitem(sys.modules, mod)
    with pytest.raises(E.MissingDependencyError) as ei:
        ckpt.load(make_state(seed=1), "s3://bucket/x")
    msg = check(ei.value, E.MissingDependencyError, ImportError, path="s3://bucket", hint="pip install")
    assert "s3" in ei.value.hint and "s3" in msg
    with pytest.raises(ImportError):  # callers that do not know ckpt
        ckpt.save(make_state(seed=1), "s3://bucket/run/step-000000001")
    with pytest.raises(E.MissingDependencyError):
        ckpt.list_checkpoints("s3://bucket/run")
    assert_untouched(committed)


# ---------------------------------------------------------------------------
# pickle needs an explicit opt-in, on save and on load
# ---------------------------------------------------------------------------


class Opaque:
    """Not JSON: needs pickle."""

    def __init__(self, v: int) -> None:
        self.v = v

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.v == self.v


@pytest.mark.parametrize("where", ["top", "nested"])
def test_pickle_needed_on_save_without_opt_in(tmp_path: Path, committed, where):
    d = tmp_path / "run" / "step-000000002"
    state = {"obj": Opaque(1)} if where == "top" else {"cfg": {"lr": 0.1, "obj": Opaque(1)}}
    key = "obj" if where == "top" else "cfg/obj"
    with pytest.raises(E.PickleNotAllowedError) as ei:
        ckpt.save(state, d)
    check(ei.value, E.PickleNotAllowedError, TypeError, key=key, hint="allow_pickle=True")
    assert not d.exists() and not any(p.name.startswith(".tmp-") for p in d.parent.iterdir())
    # with the opt-in it saves, and loads back with the opt-in
    ckpt.save(state, d, allow_pickle=True)
    fresh = {k: None for k in state}
    ckpt.load(fresh, d, allow_pickle=True)
    assert fresh == state
    # saving onto the committed checkpoint with overwrite, but no opt-in: it is untouched
    with pytest.raises(E.PickleNotAllowedError):
        ckpt.save({**committed[1], "obj": Opaque(2)}, committed[0], overwrite=True)
    assert_untouched(committed)


@pytest.mark.parametrize("where", ["top", "nested"])
def test_pickle_on_load_without_opt_in(tmp_path: Path, where):
    d = tmp_path / "run" / "step-000000001"
    state = {"obj": Opaque(1)} if where == "top" else {"cfg": {"obj": Opaque(1)}}
    key = "obj" if where == "top" else "cfg/obj"
    ckpt.save(state, d, allow_pickle=True)
    before = snapshot(d)
    fresh: dict[str, Any] = {k: None for k in state}
    with pytest.raises(E.PickleNotAllowedError) as ei:
        ckpt.load(fresh, d)
    check(ei.value, E.PickleNotAllowedError, TypeError, key=key, path=d, hint="allow_pickle=True")
    assert fresh == {k: None for k in state}  # nothing was unpickled or replaced
    assert snapshot(d) == before
    ckpt.load(fresh, d, allow_pickle=True)
    assert fresh == state


# ---------------------------------------------------------------------------
# keys that try to escape the checkpoint directory
# ---------------------------------------------------------------------------


def test_hostile_state_keys_stay_inside(tmp_path: Path):
    run = tmp_path / "a" / "b" / "run"
    d = run / "step-000000001"
    big = torch.arange(100_000, dtype=torch.float32)  # own array: its path comes from the key
    state = {
        "../../evil": big.clone(),
        "..": {"..": big.clone() + 1, "/etc/passwd": torch.ones(3), "../x": Opaque(5)},
        "/abs": big.clone() + 2,
        ".": torch.zeros(2),
    }
    ckpt.save(state, d, allow_pickle=True)
    assert files_outside(tmp_path, d) == []
    assert not (tmp_path / "a" / "evil").exists() and not (tmp_path / "evil").exists()
    keys = set(json.loads((d / "manifest.json").read_bytes())["entries"])
    assert {"../../evil", "/abs", "."} <= {k.replace("%2F", "/") for k in keys}
    fresh = {
        "../../evil": torch.zeros_like(big),
        "..": {"..": torch.zeros_like(big), "/etc/passwd": torch.zeros(3), "../x": None},
        "/abs": torch.zeros_like(big),
        ".": torch.ones(2),
    }
    ckpt.load(fresh, d, allow_pickle=True)
    assert torch.equal(fresh["../../evil"], big)
    assert torch.equal(fresh[".."][".."], big + 1)
    assert torch.equal(fresh[".."]["/etc/passwd"], torch.ones(3))
    assert fresh[".."]["../x"] == Opaque(5)
    assert torch.equal(fresh["/abs"], big + 2)
    assert torch.equal(fresh["."], torch.zeros(2))
    assert files_outside(tmp_path, d) == []


@pytest.mark.parametrize("bad", ["", 3, None])
def test_bad_top_level_key(tmp_path: Path, bad):
    d = tmp_path / "run" / "step-000000001"
    with pytest.raises(E.UnsafePathError) as ei:
        ckpt.save({bad: torch.ones(2)}, d)
    check(ei.value, E.UnsafePathError, ValueError, key=str(bad))
    assert not d.exists()


# ---------------------------------------------------------------------------
# what cannot be saved, and where it cannot go
# ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*quantize.*:UserWarning")
@pytest.mark.parametrize("kind", ["quantized", "uint1"])
def test_unsupported_dtype(tmp_path: Path, committed, kind):
    if kind == "quantized":
        t = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.quint8)
    else:
        if not hasattr(torch, "uint1"):
            pytest.skip("torch.uint1 is not in this torch")
        try:
            t = torch.empty(8, dtype=torch.uint1)
        except Exception:  # noqa: BLE001
            pytest.skip("this torch cannot allocate uint1 tensors")
    state = make_state(seed=1)
    state["model"].register_buffer("odd", t)
    d = tmp_path / "run" / "step-000000003"
    with pytest.raises(E.UnsupportedDtypeError) as ei:
        ckpt.save(state, d)
    msg = check(ei.value, E.UnsupportedDtypeError, TypeError, key="model/odd", hint="float32")
    assert str(t.dtype) in msg
    assert not d.exists()
    with pytest.raises(E.UnsupportedDtypeError):
        ckpt.save(state, committed[0], overwrite=True)
    assert_untouched(committed)


def test_existing_checkpoint_without_overwrite(committed):
    d, _, _ = committed
    other = make_state(seed=5)
    with pytest.raises(E.CheckpointExistsError) as ei:
        ckpt.save(other, d)
    check(ei.value, E.CheckpointExistsError, FileExistsError, path=d, hint="overwrite=True")
    assert_untouched(committed)
    assert [p.name for p in d.parent.iterdir()] == [d.name]  # no temporary debris
    # with overwrite=True it is replaced
    ckpt.save(other, d, overwrite=True)
    assert_loads_equal(d, other)
    assert [p.name for p in d.parent.iterdir()] == [d.name]


def test_non_dict_state(tmp_path: Path, committed):
    m = make_model()
    d = tmp_path / "run" / "step-000000001"
    with pytest.raises(E.UnsupportedStateError) as ei:
        ckpt.save([m], d)
    msg = check(ei.value, E.UnsupportedStateError, TypeError, hint='{"model": model')
    assert "list" in msg
    assert not d.exists()
    with pytest.raises(E.UnsupportedStateError):
        ckpt.load(m, committed[0])
    assert_untouched(committed)


def test_meta_tensor_on_save(tmp_path: Path, committed):
    with torch.device("meta"):
        m = make_model()
    d = tmp_path / "run" / "step-000000001"
    with pytest.raises(E.UnsupportedStateError) as ei:
        ckpt.save({"model": m}, d)
    check(ei.value, E.UnsupportedStateError, TypeError, key="model/0.weight", hint="to_empty")
    assert not d.exists()
    with pytest.raises(E.UnsupportedStateError):
        ckpt.save({"model": m}, committed[0], overwrite=True)
    assert_untouched(committed)


def test_corrupt_data_byte_is_named(tmp_path: Path):
    big = torch.arange(100_000, dtype=torch.float32)
    d = tmp_path / "run" / "step-000000001"
    ckpt.save({"w": big}, d)
    shard = next(p for p in (d / "arrays").rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(E.CorruptCheckpointError) as ei:
        ckpt.load({"w": torch.zeros_like(big)}, d)
    check(ei.value, E.CorruptCheckpointError, OSError, key="w", path=str(d), hint="earlier")
