"""Hugging Face: ``transformers.Trainer`` runs that checkpoint through ckpt and resume.

    from ckpt.integrations.hf import CkptTrainer

    trainer = CkptTrainer(model=model, args=TrainingArguments(output_dir="out", save_steps=500), ...)
    trainer.train()                                # checkpoints out/checkpoint-<step>/ through ckpt
    trainer.train(resume_from_checkpoint=True)     # the newest committed one, bit-exact

Two parts, because of how the Trainer works. Saving is a ``TrainerCallback``
(:class:`CkptCallback`): on the Trainer's own schedule (``save_strategy``,
``save_steps``) it snapshots the model, optimizer, LR scheduler, every RNG and the
``TrainerState`` with ``ckpt.save_async`` into ``<output_dir>/checkpoint-<step>`` (the
name the Trainer and its users expect), then clears ``control.should_save`` so the
Trainer does not write its own files; ``save_total_limit`` is applied once a save
commits. Resuming cannot be a callback: the Trainer reads its own files
(``trainer_state.json``, weights, ``optimizer.pt``, ``rng_state.pth``) inside
``train()`` before any event fires, to fast-forward the data. :class:`CkptTrainerMixin`
(and ``CkptTrainer``, the mixin on ``Trainer``) makes those loads read a ckpt checkpoint
when the directory is one, and defers to the Trainer's own code otherwise.

The checkpoint carries the model's config (``user_metadata["transformers"]``), so
``ckpt export CK OUT`` writes ``config.json`` and ``model.safetensors`` that
``from_pretrained(OUT)`` opens. Tied weights (``lm_head.weight`` and the input
embedding) are stored once, under the first name the module gives them; the names
they are also known by are listed in the metadata.

Distributed runs call the callback on every rank: the save is ckpt's collective save
(replicated tensors written once), each rank's RNG kept per rank.
Not covered: best-model tracking (``load_best_model_at_end``, metric-based
``save_total_limit`` exceptions), DeepSpeed and FSDP checkpoints (their own formats).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import torch

import ckpt
from ckpt.errors import MissingDependencyError
from ckpt.integrations._dict import delete_checkpoint
from ckpt.providers import register_provider
from ckpt.providers._torch import ModuleProvider

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise MissingDependencyError("ckpt.integrations.hf needs transformers, which is not installed",
                                 hint="pip install 'ckpt-torch[hf]'") from e

__all__ = ["CkptCallback", "CkptTrainerMixin", "CkptTrainer", "latest_checkpoint", "META"]

META = "transformers"
STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class _TiedOnceModule:
    """Marks a module whose aliased tensors (tied weights) are stored once."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module


class _TiedOnceProvider(ModuleProvider):
    def __init__(self, obj: _TiedOnceModule, prefix: str, ctx: Any) -> None:
        super().__init__(obj.module, prefix, ctx)

    def _state(self) -> dict[str, Any]:
        return {k: v for k, v in super()._state().items() if k not in tied_aliases(self.module)}


register_provider(_TiedOnceModule, _TiedOnceProvider)


def tied_aliases(module: torch.nn.Module) -> dict[str, str]:
    """State-dict names that alias an earlier name's tensor (tied weights): alias -> name."""
    seen: dict[tuple[Any, ...], str] = {}
    out: dict[str, str] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor) or type(t).__name__ == "DTensor" or t.device.type == "meta":
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if ident[0] == 0:
            continue
        if ident in seen:
            out[name] = seen[ident]
        else:
            seen[ident] = name
    return out


def _unwrap(obj: Any, attr: str) -> Any:
    """accelerate's AcceleratedOptimizer / AcceleratedScheduler hold the torch object."""
    return getattr(obj, attr, obj) if obj is not None else None


def _state(model: torch.nn.Module, optimizer: Any, scheduler: Any, rng: ckpt.RNGState) -> dict[str, Any]:
    state: dict[str, Any] = {"model": _TiedOnceModule(model), "rng": rng}
    if optimizer is not None:
        state["optimizer"] = _unwrap(optimizer, "optimizer")
    if scheduler is not None:
        state["lr_scheduler"] = _unwrap(scheduler, "scheduler")
    return state


def _config(model: torch.nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    out: dict[str, Any] = json.loads(config.to_json_string(use_diff=False))
    if not out.get("architectures"):
        out["architectures"] = [type(model).__name__]  # what save_pretrained writes
    return out


class CkptCallback(TrainerCallback):  # type: ignore[misc]
    """Saves through ckpt on the Trainer's save schedule instead of the Trainer's files.

    ``async_save``: return once the state is staged (the default); the optimizer's next
    step waits for the copy. ``options``: :class:`ckpt.SaveOptions`.
    """

    def __init__(self, *, async_save: bool = True, options: ckpt.SaveOptions | None = None) -> None:
        self.async_save = async_save
        self._snap = ckpt.Snapshotter(options)
        self._handles: list[ckpt.SaveHandle] = []
        self.trainer_callbacks: list[Any] = []  # the Trainer's callbacks (CkptTrainerMixin sets them)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        return self._maybe_save(args, state, control, kwargs)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        return self._maybe_save(args, state, control, kwargs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._finished(args, state, wait=True)
        return control

    def _maybe_save(self, args: Any, state: Any, control: Any, kw: dict[str, Any]) -> Any:
        if not control.should_save:
            return control
        control.should_save = False  # the Trainer must not write its own checkpoint too
        model = kw["model"]
        url = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        _record_callback_states(state, control, self.trainer_callbacks)
        meta = {"trainer_state": json.loads(json.dumps(dataclasses.asdict(state))), "config": _config(model),
                "model_class": type(model).__name__, "tied": tied_aliases(model)}
        st = _state(model, kw.get("optimizer"), kw.get("lr_scheduler"), ckpt.RNGState())
        self._finished(args, state)
        opts: dict[str, Any] = dict(step=state.global_step, overwrite=True, metadata={META: meta})
        if self.async_save:
            self._handles.append(self._snap.save_async(st, url, **opts))
        else:
            self._snap.save(st, url, **opts)
            self._finished(args, state)
        return control

    def _finished(self, args: Any, state: Any, *, wait: bool = False) -> None:
        """Raise the failure of a finished save; apply ``save_total_limit`` to what has
        committed (on the training thread, rank 0)."""
        done = [h for h in self._handles if wait or h.done()]
        self._handles = [h for h in self._handles if h not in done]
        for h in done:
            h.result()
        if args.save_total_limit and state.is_world_process_zero:
            _retain(args.output_dir, args.save_total_limit)


def _record_callback_states(state: Any, control: Any, callbacks: list[Any]) -> None:
    """What the Trainer does before it writes trainer_state.json: the current state of
    every ``ExportableState`` callback (early stopping...) and of the control."""
    from transformers.trainer_callback import ExportableState

    for cb in [cb for cb in callbacks + [control] if isinstance(cb, ExportableState)]:
        name = cb.__class__.__name__
        if isinstance(state.stateful_callbacks.get(name), list):
            state.stateful_callbacks[name].append(cb.state())
        else:
            state.stateful_callbacks[name] = cb.state()


def _committed(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the committed ckpt checkpoints ``checkpoint-<step>``, oldest first:
    the run listing (``ckpt.list_checkpoints``) narrowed to the Trainer's names."""
    if not os.path.isdir(output_dir):
        return []
    return [(int(m.group(1)), os.path.join(output_dir, info.name))
            for info in reversed(ckpt.list_checkpoints(output_dir)) if (m := _CHECKPOINT.match(info.name))]


def _retain(output_dir: str, limit: int) -> None:
    for _, path in _committed(output_dir)[:-limit]:
        delete_checkpoint(path)


def is_ckpt_checkpoint(path: str | os.PathLike[str]) -> bool:
    from ckpt._format import MANIFEST

    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> str | None:
    """The newest committed ckpt checkpoint ``<output_dir>/checkpoint-<step>``, or None."""
    found = _committed(os.fspath(output_dir))
    return found[-1][1] if found else None


class CkptTrainerMixin:
    """Trainer methods that resume from ckpt checkpoints; put it before ``Trainer`` (or
    your Trainer subclass) in the bases. Adds a :class:`CkptCallback` unless one is
    given in ``callbacks``; ``ckpt_async`` and ``ckpt_options`` configure it."""

    def __init__(self, *args: Any, ckpt_async: bool = True, ckpt_options: ckpt.SaveOptions | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        callbacks = self.callback_handler.callbacks  # type: ignore[attr-defined]
        if not any(isinstance(cb, CkptCallback) for cb in callbacks):
            self.add_callback(CkptCallback(async_save=ckpt_async, options=ckpt_options))  # type: ignore[attr-defined]
        for cb in callbacks:
            if isinstance(cb, CkptCallback):
                cb.trainer_callbacks = callbacks
        self._ckpt_rng: dict[str, Any] | None = None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if resume_from_checkpoint is True:
            found = latest_checkpoint(self.args.output_dir)  # type: ignore[attr-defined]
            resume_from_checkpoint = found if found is not None else True
        if isinstance(resume_from_checkpoint, str | os.PathLike) and is_ckpt_checkpoint(resume_from_checkpoint):
            _write_trainer_state(os.fspath(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not is_ckpt_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc, no-any-return]
        return None  # loaded with the optimizer, below (one pass over the checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not is_ckpt_checkpoint(checkpoint):
            return super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc, no-any-return]
        from ckpt.providers._rng import capture

        state = _state(self.model, self.optimizer, self.lr_scheduler, ckpt.RNGState())  # type: ignore[attr-defined]
        ckpt.load(state, checkpoint)
        self._ckpt_rng = capture()  # as saved: the Trainer sets it once the data is fast-forwarded
        return None

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not is_ckpt_checkpoint(checkpoint):
            return super()._load_rng_state(checkpoint)  # type: ignore[misc, no-any-return]
        if self._ckpt_rng is not None:
            from ckpt.providers._rng import restore

            restore(self._ckpt_rng)
        return None

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not is_ckpt_checkpoint(checkpoint):
            return super()._load_scaler(checkpoint)  # type: ignore[misc, no-any-return]
        return None


def _write_trainer_state(path: str) -> None:
    """The Trainer reads ``trainer_state.json`` from the checkpoint directory itself; the
    state is in the manifest, and this file is written from it (once, not by the save)."""
    target = os.path.join(path, STATE_FILE)
    if os.path.isfile(target):
        return
    meta = ckpt.read_manifest(path).user_metadata.get(META) or {}
    if "trainer_state" not in meta:
        return
    tmp = f"{target}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(meta["trainer_state"], indent=2, sort_keys=True) + "\n")  # as TrainerState.save_to_json
    os.replace(tmp, target)


class CkptTrainer(CkptTrainerMixin, Trainer):  # type: ignore[misc]
    """``transformers.Trainer`` that checkpoints through ckpt (see the module docstring)."""
