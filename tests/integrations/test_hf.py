"""ckpt.integrations.hf with a real transformers.Trainer (a tiny GPT-2 built from a config:
no download), resumed bit-exact; ``ckpt export`` opened by ``from_pretrained``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments  # noqa: E402

import ckpt  # noqa: E402
from ckpt.integrations.hf import CkptTrainer, latest_checkpoint  # noqa: E402

transformers.logging.set_verbosity_error()
logging.getLogger("accelerate").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (20, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    # dropout on: a resume is bit-exact only if every RNG comes back too
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def _trainer(model: GPT2LMHeadModel, out: Path, *, max_steps: int = 8, save_steps: int = 3,
             limit: int | None = None, stop_at: int | None = None) -> CkptTrainer:
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, save_steps=save_steps,
                             save_total_limit=limit, per_device_train_batch_size=4, learning_rate=1e-3,
                             lr_scheduler_type="constant_with_warmup", warmup_steps=2, logging_steps=1,
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return CkptTrainer(model=model, args=args, train_dataset=Tokens(),
                       callbacks=[StopAt(stop_at)] if stop_at else None,
                       ckpt_options=ckpt.SaveOptions(cpu_staging="background"))


def _losses(trainer: CkptTrainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GPT2LMHeadModel, dict[int, float]]:
    out = tmp_path_factory.mktemp("ref")
    model = _model(0)
    trainer = _trainer(model, out)
    trainer.train()
    return out, model, _losses(trainer)


def test_checkpoints_are_ckpt_checkpoints_with_tied_weights_once(reference) -> None:  # type: ignore[no-untyped-def]
    out, model, _ = reference
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    ck = out / "checkpoint-3"
    files = {p.name for p in ck.iterdir()}
    assert "manifest.json" in files and files <= {"manifest.json", "arrays", "packs", "ranks"}  # none of the Trainer's
    m = ckpt.read_manifest(ck)
    assert m.step == 3
    assert "model/transformer.wte.weight" in m.entries and "model/lm_head.weight" not in m.entries
    meta = m.user_metadata["transformers"]
    assert meta["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert meta["trainer_state"]["global_step"] == 3 and meta["config"]["n_embd"] == 32


@pytest.mark.parametrize("how", ["path", "latest"])
def test_trainer_resumes_bit_exact(reference, tmp_path: Path, how: str) -> None:  # type: ignore[no-untyped-def]
    ref_out, ref_model, ref_losses = reference
    if how == "path":  # mid-epoch (5 steps per epoch), written while the reference trained on
        trainer = _trainer(_model(1), tmp_path)
        trainer.train(resume_from_checkpoint=str(ref_out / "checkpoint-3"))
        start = 3
    else:  # an interrupted run of its own, resumed with resume_from_checkpoint=True
        first = _trainer(_model(0), tmp_path, save_steps=2, limit=1, stop_at=4)
        first.train()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]  # save_total_limit, nothing else
        assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
        trainer = _trainer(_model(1), tmp_path, save_steps=2, limit=1)
        trainer.train(resume_from_checkpoint=True)
        start = 4
    assert trainer.state.global_step == 8
    _same(trainer.model, ref_model)
    losses = _losses(trainer)
    assert {s: v for s, v in losses.items() if s > start} == {s: v for s, v in ref_losses.items() if s > start}


def test_export_opens_with_from_pretrained(reference, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from safetensors import safe_open

    from ckpt._cli.main import main

    ref_out, ref_model, _ = reference
    assert main(["export", str(ref_out / "checkpoint-8"), str(tmp_path / "hf")]) == 0
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names  # tied: stored once
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    _same(loaded, ref_model)
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    _same(auto, ref_model)
