"""Issue #36, case 4: failures that used to surface as bare builtins or torch errors are
typed ckpt errors naming the key and the path and saying what to do — or work."""

from __future__ import annotations

import pytest
import torch

import ckpt
from ckpt.errors import (
    CheckpointError,
    NotADirectoryPathError,
    UnexpectedKeyError,
    UnsupportedStateError,
)


def test_a_run_that_is_a_file(tmp_path):
    run = tmp_path / "run"
    run.write_text("not a directory")
    with pytest.raises(NotADirectoryPathError) as ei:
        ckpt.list_checkpoints(str(run))
    assert isinstance(ei.value, NotADirectoryError) and str(run) in ei.value.path and ei.value.hint
    mgr = ckpt.CheckpointManager(str(run), save=1, keep=1, save_on_close=False)
    mgr.step(0, {"t": torch.zeros(3)})  # a failed save never raises into the loop
    mgr.wait()
    assert mgr.failures and all(isinstance(e, CheckpointError) for _, e in mgr.failures)
    with pytest.raises(NotADirectoryPathError):
        mgr.apply_retention()
    mgr.close()


def test_retention_on_a_run_that_became_a_file(tmp_path):
    run = tmp_path / "run"
    mgr = ckpt.CheckpointManager(str(run), save=1, keep=1)
    run.write_text("replaced by a file")
    with pytest.raises(NotADirectoryPathError):
        mgr.apply_retention()


@pytest.mark.parametrize("make", [
    lambda: torch.randn(70000, dtype=torch.complex64).conj(),  # array layout
    lambda: torch.randn(8, dtype=torch.complex64).conj(),  # packed
    lambda: torch._neg_view(torch.randn(300000)),
    lambda: torch._neg_view(torch.randn(300000, dtype=torch.complex64)).conj(),
])
def test_lazy_views_save_the_values_the_user_sees(tmp_path, make):
    t = make()
    seen = t.resolve_conj().resolve_neg().clone()
    url = str(tmp_path / "ck")
    ckpt.save({"t": t}, url)
    back = {"t": torch.zeros_like(seen)}
    ckpt.load(back, url)
    assert torch.equal(back["t"], seen)


def test_loading_into_an_expanded_tensor(tmp_path):
    url = str(tmp_path / "ck")
    ckpt.save({"t": torch.arange(16.0).reshape(4, 4)}, url)
    dest = torch.zeros(4).expand(4, 4)
    with pytest.raises(UnsupportedStateError) as ei:
        ckpt.load({"t": dest}, url)
    assert ei.value.key == "t" and "real tensor" in ei.value.hint
    assert torch.equal(dest, torch.zeros(4, 4))


def _model_and_optim():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("strict", [True, False])
def test_an_optimizer_without_its_module_never_loads_nothing_silently(tmp_path, strict):
    model, opt = _model_and_optim()
    url = str(tmp_path / "ck")
    ckpt.save({"model": model, "optim": opt}, url)
    lone = torch.optim.Adam(torch.nn.Linear(3, 3).parameters())
    with pytest.raises(UnexpectedKeyError) as ei:
        ckpt.load({"optim": lone}, url, strict=strict)
    assert "{'model': model, 'optim': optim}" in ei.value.hint
    assert not lone.state
    # with the module beside it, it loads
    m2 = torch.nn.Linear(3, 3)
    o2 = torch.optim.Adam(m2.parameters())
    ckpt.load({"model": m2, "optim": o2}, url, strict=strict)
    assert torch.equal(o2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_new_errors_are_ckpt_errors():
    assert issubclass(NotADirectoryPathError, CheckpointError)
