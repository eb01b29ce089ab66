"""CkptCheckpointIO with a real Lightning Trainer: fit, checkpoint, resume bit-exact."""

from __future__ import annotations

import argparse
import copy
import logging
import os
import pickle
from collections import OrderedDict
from pathlib import Path, PurePosixPath

import pytest
import torch

L = pytest.importorskip("lightning")

from lightning.fabric.utilities.data import AttributeDict  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import ckpt  # noqa: E402
from ckpt.errors import CheckpointNotFoundError, PickleNotAllowedError  # noqa: E402
from ckpt.integrations.lightning import CkptCheckpointIO  # noqa: E402

logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Net(L.LightningModule):
    def __init__(self, lr: float = 0.05, data_dir: Path = Path("/data/set"),
                 cfg: argparse.Namespace | None = None, extra: AttributeDict | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _i: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)),
                      batch_size=8)  # 4 steps per epoch, no shuffle: the data order needs no RNG


def _model(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net(cfg=argparse.Namespace(depth=2, out=PurePosixPath("out")), extra=AttributeDict(a=1, b=[1, 2]))


def _fit(model: Net, root: Path, epochs: int, io: CkptCheckpointIO | None, ckpt_path: str | None = None) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        plugins=[io] if io is not None else None,
                        callbacks=[ModelCheckpoint(dirpath=root, save_last=True, save_top_k=-1)])
    trainer.fit(model, _data(), ckpt_path=ckpt_path)
    return trainer


def _io(async_save: bool) -> CkptCheckpointIO:
    # background staging: the copy overlaps the next steps (the path a GPU job takes)
    return CkptCheckpointIO(async_save=async_save,
                            options=ckpt.SaveOptions(cpu_staging="background") if async_save else None)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_fit_resumes_bit_exact_from_a_path_and_from_last(tmp_path: Path, async_save: bool) -> None:
    ref = _model(0)
    _fit(ref, tmp_path / "ref", 4, None)  # Lightning's own torch.save checkpoints

    first = _model(0)
    _fit(first, tmp_path / "run", 2, _io(async_save))
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"]
    assert ckpt.read_manifest(run / "last.ckpt").step == 8
    assert not any(e["kind"] == "pickle" for e in ckpt.read_manifest(run / "last.ckpt").entries.values())

    # From "last" (the end of epoch 1) and from the epoch-0 checkpoint, whose background
    # copy overlapped epoch 1's steps: both continue exactly as the uninterrupted run.
    # ("last" is looked up in the ModelCheckpoint's dirpath: the resumed run writes there too.)
    for ckpt_path, root in (("last", run), (str(run / "epoch=0-step=4.ckpt"), tmp_path / "other")):
        resumed = _model(1)  # other initial weights: everything must come from the checkpoint
        trainer = _fit(resumed, root, 4, _io(async_save), ckpt_path=ckpt_path)
        assert trainer.global_step == 16
        _same_state(resumed, ref)
        opt_r = resumed.optimizers().optimizer.state_dict()  # type: ignore[union-attr]
        opt_ref = ref.optimizers().optimizer.state_dict()  # type: ignore[union-attr]
        for i, st in opt_ref["state"].items():
            for name, v in st.items():
                assert torch.equal(opt_r["state"][i][name], v), (ckpt_path, i, name)
        assert resumed.lr_schedulers().state_dict() == ref.lr_schedulers().state_dict()  # type: ignore[union-attr]


class _Recording(CkptCheckpointIO):
    """Keeps a deep copy of every dict Lightning hands over."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: dict[str, dict] = {}

    def save_checkpoint(self, checkpoint, path, storage_options=None):  # type: ignore[no-untyped-def]
        self.saved[os.fspath(path)] = copy.deepcopy(checkpoint)
        super().save_checkpoint(checkpoint, path, storage_options)


def test_lightning_dict_round_trips_without_pickle(tmp_path: Path) -> None:
    model = _model(0)
    io = _Recording()
    _fit(model, tmp_path / "run", 1, io)
    last = str(tmp_path / "run" / "last.ckpt")
    loaded = CkptCheckpointIO().load_checkpoint(last)
    ref = io.saved[last]

    def same(a: object, b: object, where: str) -> None:
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
            return
        assert type(a) is type(b) or isinstance(b, OrderedDict) and type(a) is dict, (where, type(a), type(b))
        if isinstance(b, dict):
            assert list(a) == list(b), where  # type: ignore[arg-type]
            for k in b:
                same(a[k], b[k], f"{where}/{k}")  # type: ignore[index]
        elif isinstance(b, list | tuple):
            assert len(a) == len(b), where  # type: ignore[arg-type]
            for i, (x, y) in enumerate(zip(a, b)):  # type: ignore[call-overload]
                same(x, y, f"{where}/{i}")
        else:
            assert a == b, where

    same(loaded, ref, "")
    hp = loaded["hyper_parameters"]
    assert hp["data_dir"] == Path("/data/set") and type(hp["data_dir"]) is type(Path())
    assert hp["cfg"] == argparse.Namespace(depth=2, out=PurePosixPath("out"))
    assert type(hp["extra"]) is AttributeDict and hp["extra"].b == [1, 2]
    assert loaded["pytorch-lightning_version"] == L.__version__
    # the top-level objects are ckpt's: the module loads straight from the checkpoint
    fresh = _model(1)
    ckpt.load({"state_dict": fresh}, tmp_path / "run" / "last.ckpt", strict=False)
    _same_state(fresh, model)


class Odd:
    """A value that is not JSON."""


def test_values_that_are_not_json_need_allow_pickle(tmp_path: Path) -> None:
    io = CkptCheckpointIO()
    ck = {"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"odd": Odd()}, "global_step": 3}
    with pytest.raises(PickleNotAllowedError) as e:
        io.save_checkpoint(ck, tmp_path / "a.ckpt")
    assert "hyper_parameters" in str(e.value)
    assert not (tmp_path / "a.ckpt").exists()
    # a top-level tensor and a pickled value with the opt-in
    io = CkptCheckpointIO(allow_pickle=True)
    io.save_checkpoint({"ema": torch.arange(3.0), "odd": Odd()}, tmp_path / "b.ckpt")
    back = io.load_checkpoint(tmp_path / "b.ckpt")
    assert torch.equal(back["ema"], torch.arange(3.0)) and type(back["odd"]).__name__ == "Odd"
    with pytest.raises(PickleNotAllowedError):
        io.load_checkpoint(tmp_path / "b.ckpt", weights_only=True)


def test_remove_waits_for_the_save_in_flight_and_deletes_manifest_first(tmp_path: Path) -> None:
    io = CkptCheckpointIO(async_save=True, options=ckpt.SaveOptions(cpu_staging="background"))
    state = {"state_dict": {"w": torch.randn(256, 256)}, "global_step": 1}
    io.save_checkpoint(state, tmp_path / "a.ckpt")
    io.remove_checkpoint(tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary directory left behind
    io.save_checkpoint(state, tmp_path / "b.ckpt")
    out = io.load_checkpoint(tmp_path / "b.ckpt")  # waits for the save to commit
    assert torch.equal(out["state_dict"]["w"], state["state_dict"]["w"])
    io.teardown()
    with pytest.raises(CheckpointNotFoundError):
        io.load_checkpoint(tmp_path / "a.ckpt")


def test_plugin_pickles_for_ddp_spawn(tmp_path: Path) -> None:
    io = CkptCheckpointIO(async_save=True, storage_options={"anon": False})
    io.save_checkpoint({"x": torch.ones(3)}, tmp_path / "x.ckpt")
    clone = pickle.loads(pickle.dumps(io))
    assert clone.async_save and clone.storage_options == {"anon": False}
    io.teardown()
    assert torch.equal(clone.load_checkpoint(tmp_path / "x.ckpt")["x"], torch.ones(3))


def test_async_copies_only_optimizer_owned_tensors_after_the_call() -> None:
    """Parameters and optimizer state may be copied in the background (the next optimizer
    step waits for the copy); buffers change in the next forward and are copied at once."""
    io = CkptCheckpointIO(async_save=True)
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters())
    model.net(torch.randn(8, 4)).sum().backward()
    opt.step()  # the plugin's hook sees the optimizer
    later = io._background_ok()
    sd = model.state_dict()
    assert later(sd["net.0.weight"]) and later(opt.state_dict()["state"][0]["exp_avg"])
    assert not later(sd["net.1.running_mean"]) and not later(sd["net.1.num_batches_tracked"])
    assert not later(torch.ones(2))


def _ddp_spawn_round_trip(root: Path) -> None:
    def fit(model: Net, epochs: int, ckpt_path: str | None = None) -> L.Trainer:
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            plugins=[CkptCheckpointIO(async_save=True)],
                            callbacks=[ModelCheckpoint(dirpath=root / "run", save_last=True)])
        trainer.fit(model, _data(), ckpt_path=ckpt_path)
        return trainer

    first = _model(0)
    fit(first, 1)  # the spawn launcher hands the final weights back to this process through the plugin
    last = root / "run" / "last.ckpt"
    assert ckpt.read_manifest(last).world_size == 1 and ckpt.read_manifest(last).step == 2  # 2 ranks: 2 steps
    assert not torch.equal(first.state_dict()["net.0.weight"], _model(0).state_dict()["net.0.weight"])
    resumed = _model(1)
    fit(resumed, 1, ckpt_path="last")  # restored on both ranks; the epoch is already done: no step
    _same_state(resumed, first)


@pytest.mark.slow
def test_ddp_spawn_saves_on_rank_zero_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two gloo ranks (ddp_spawn pickles the plugin into each): the strategy saves on
    rank 0 only, as a one-process save while the other rank trains on; both ranks load.

    Rarely (twice in ~10 full-suite runs, never in 60 runs of this test alone) a spawned
    worker aborts in native code ("terminate called without an active exception") as it
    ends; Lightning's ddp_spawn leaves the gloo group to interpreter shutdown. The round
    trip is then run once more, in a fresh directory, with every worker's Python stacks
    dumped on the abort (PYTHONFAULTHANDLER) so the log shows where it was."""
    from torch.multiprocessing.spawn import ProcessExitedException

    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")
    try:
        _ddp_spawn_round_trip(tmp_path / "first")
    except ProcessExitedException as e:
        if e.signal_name != "SIGABRT":
            raise
        logging.getLogger(__name__).warning("a ddp_spawn worker aborted (%s); running the round trip again", e)
        _ddp_spawn_round_trip(tmp_path / "again")


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_documented_weights_only_load_is_bit_exact(tmp_path: Path, async_save: bool) -> None:
    """README / docs/frameworks.md: ``ckpt.load({"state_dict": lightning_module}, "runs/a/last.ckpt")``,
    strict (the default), loads the weights alone (was UnexpectedKeyError ... ['state_dict'])."""
    trained = _model(0)
    _fit(trained, tmp_path / "runs" / "a", 1, _io(async_save))
    lightning_module = _model(1)  # other weights: every one must come from the checkpoint
    stats = ckpt.load({"state_dict": lightning_module}, tmp_path / "runs" / "a" / "last.ckpt")
    _same_state(lightning_module, trained)
    assert "state_dict" not in stats.skipped and "optimizer_states" in stats.skipped
    assert stats.missing == [] and stats.unexpected == []
