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
