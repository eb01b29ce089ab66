"""The ``ckpt`` command and run listing where a user strays from ``step-*`` runs (#37)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ckpt
from ckpt._cli.main import main


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _hf_run(root: Path) -> Path:
    """A Hugging Face style output folder: checkpoint-5, -10, -15, -20."""
    for step in (5, 10, 15, 20):
        ckpt.save({"w": torch.full((4,), float(step))}, root / f"checkpoint-{step}", step=step)
    return root


def test_hf_names_order_by_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _hf_run(tmp_path / "out")
    assert [i.name for i in ckpt.list_checkpoints(run)] == [f"checkpoint-{s}" for s in (20, 15, 10, 5)]
    newest = ckpt.latest(run)
    assert newest is not None and newest.name == "checkpoint-20"
    code, out, _ = _cli(capsys, "ls", str(run))
    assert code == 0
    assert [out.find(f"checkpoint-{s}") for s in (20, 15, 10, 5)] == sorted(
        out.find(f"checkpoint-{s}") for s in (20, 15, 10, 5))


def test_gc_keep_last_on_hf_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _hf_run(tmp_path / "out")
    code, _, _ = _cli(capsys, "gc", str(run), "--keep-last", "2")
    assert code == 0
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-15", "checkpoint-20"]


def test_unnamed_checkpoint_orders_by_manifest_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ckpt.save({"w": torch.zeros(2)}, run / "step-000000010", step=10)
    ckpt.save({"w": torch.zeros(2)}, run / "final", step=30)
    assert [(i.name, i.step) for i in ckpt.list_checkpoints(run)] == [("final", 30), ("step-000000010", 10)]


def test_gc_never_retires_a_hand_named_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _hf_run(tmp_path / "out")
    ckpt.save({"w": torch.zeros(2)}, run / "best", step=1)
    assert _cli(capsys, "gc", str(run), "--keep-last", "1")[0] == 0
    assert sorted(p.name for p in run.iterdir()) == ["best", "checkpoint-20"]


def test_ls_of_one_checkpoint_points_at_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = tmp_path / "run" / "step-000000001"
    ckpt.save({"w": torch.zeros(2)}, one, step=1)
    code, _, err = _cli(capsys, "ls", str(one))
    assert code == 1 and f"ckpt info {one}" in err


def test_import_of_a_file_that_is_not_a_torch_save(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "x.py"
    src.write_text("print('hi')\n")
    code, _, err = _cli(capsys, "import", str(src), str(tmp_path / "out"))
    assert code == 1 and "not a torch.save file" in err and "allow-pickle" not in err
    assert not (tmp_path / "out").exists()
    legacy = tmp_path / "legacy.pt"  # the pre-zip format still imports
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert _cli(capsys, "import", str(legacy), str(tmp_path / "ok"))[0] == 0
    back = {"w": torch.zeros(2)}
    ckpt.load(back, tmp_path / "ok")
    assert torch.equal(back["w"], torch.ones(2))


def test_cli_says_the_overwrite_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "a.pt"
    torch.save({"w": torch.ones(2)}, src)
    assert _cli(capsys, "import", str(src), str(tmp_path / "ck"))[0] == 0
    code, _, err = _cli(capsys, "import", str(src), str(tmp_path / "ck"))
    assert code == 1 and "--overwrite" in err and "overwrite=True" not in err
    assert _cli(capsys, "import", str(src), str(tmp_path / "ck"), "--overwrite")[0] == 0


def test_export_to_a_file_name_of_another_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt.save({"w": torch.ones(2)}, tmp_path / "ck", step=1)
    code, _, err = _cli(capsys, "export", str(tmp_path / "ck"), str(tmp_path / "out.txt"))
    assert code == 1 and ".safetensors" in err and "out.txt" in err
    assert not (tmp_path / "out.txt").exists()
    assert _cli(capsys, "export", str(tmp_path / "ck"), str(tmp_path / "w.pt"), "--format", "torch")[0] == 0
    assert (tmp_path / "w.pt").is_file()
