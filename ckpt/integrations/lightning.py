"""Lightning: a ``CheckpointIO`` plugin that writes ckpt checkpoints.

    from ckpt.integrations.lightning import CkptCheckpointIO

    trainer = L.Trainer(plugins=[CkptCheckpointIO(async_save=True)], callbacks=[ModelCheckpoint(...)])
    trainer.fit(model, ckpt_path="last")

Every path Lightning names (``epoch=0-step=100.ckpt``, ``last.ckpt``; local or
``s3://``) becomes a ckpt checkpoint directory holding Lightning's whole checkpoint dict
without pickle: tensors as zarr arrays, everything else as JSON values
(docs/format.md §6, including ``pathlib`` paths and ``argparse.Namespace``;
Lightning's ``AttributeDict`` is restored from a note in the manifest).

What Lightning calls, and where: the strategy calls ``save_checkpoint`` and
``remove_checkpoint`` on global rank 0 only (DDP, FSDP with full state dicts,
``ddp_spawn``'s worker), while some launchers (XLA) call ``save_checkpoint`` on every
rank with the same replicated dict; ``load_checkpoint`` runs on every rank. So a save
is always a single-process ckpt save (no collective: the other ranks are not in it),
made by global rank 0 only, and every rank loads the whole dict.

With ``async_save=True`` the call returns once the state is staged (``ckpt.save_async``;
on a CPU host whose cores the training fills, the copy happens in the call). Parameters
and optimizer state are copied in the background: a global optimizer step pre-hook waits
for that copy before any optimizer changes them. Every other tensor (buffers such as
BatchNorm statistics, which change in the next forward, callback state) is copied at
snapshot time. A failed background save raises from the next ``save_checkpoint`` or from
``teardown`` (the end of ``fit``), which waits for the save in flight.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import os
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ckpt import SaveHandle, SaveOptions, Snapshotter
from ckpt.errors import MissingDependencyError, UnsupportedStateError
from ckpt.integrations._dict import delete_checkpoint, dict_state, load_dict, optimizer_storages

try:
    from lightning.fabric.plugins import CheckpointIO
    from lightning.fabric.utilities.data import AttributeDict
except ImportError:  # pragma: no cover - the extra is not installed
    try:
        from lightning_fabric.plugins import CheckpointIO  # type: ignore[no-redef,assignment]
        from lightning_fabric.utilities.data import AttributeDict  # type: ignore[no-redef,assignment]
    except ImportError as e:
        raise MissingDependencyError("ckpt.integrations.lightning needs Lightning, which is not installed",
                                     hint="pip install 'ckpt-torch[lightning]'") from e

__all__ = ["CkptCheckpointIO"]

META = "lightning"
log = logging.getLogger("ckpt")


class CkptCheckpointIO(CheckpointIO):
    """Lightning's checkpoints as ckpt checkpoints (``Trainer(plugins=[CkptCheckpointIO()])``).

    ``async_save``: return once the state is staged instead of once it is committed.
    ``options``: :class:`ckpt.SaveOptions` (pool size, staging...). ``storage_options``:
    for ``s3://`` paths (endpoint, credentials). ``allow_pickle``: store values that are
    not JSON with pickle (and read them back), off by default; a load with
    ``weights_only=True`` never unpickles.
    """

    def __init__(self, *, async_save: bool = False, options: SaveOptions | None = None,
                 storage_options: dict[str, Any] | None = None, allow_pickle: bool = False) -> None:
        super().__init__()
        self.async_save = async_save
        self.options = options
        self.storage_options = dict(storage_options or {})
        self.allow_pickle = allow_pickle
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._snap: Snapshotter | None = None
        self._handles: list[SaveHandle] = []
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._hook: Any = None
        if self.async_save:
            ref = weakref.ref(self)

            def pre_step(opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
                me = ref()
                if me is not None:
                    me._optimizers.add(opt)
                    if me._snap is not None:
                        me._snap.wait_staged()

            self._hook = register_optimizer_step_pre_hook(pre_step)
            weakref.finalize(self, self._hook.remove)
            # A save issued after the fit (ddp_spawn's worker hands its final weights to the
            # main process through a checkpoint, then exits) must commit before the process
            # ends: at interpreter exit, and in multiprocessing children, which skip atexit.
            atexit.register(_wait_at_exit, ref)
            multiprocessing.util.Finalize(None, _wait_at_exit, args=(ref,), exitpriority=10)

    # ddp_spawn pickles the strategy (and its plugins) into the workers
    def __getstate__(self) -> dict[str, Any]:
        keep = ("async_save", "options", "storage_options", "allow_pickle")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def _snapshotter(self) -> Snapshotter:
        if self._snap is None:
            self._snap = Snapshotter(self.options)
        return self._snap

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        if _global_rank() != 0:  # launchers that call every rank with the same (replicated) dict
            return
        url = os.fspath(path)
        if storage_options is not None and not isinstance(storage_options, dict):
            raise UnsupportedStateError(f"storage_options must be a dict, got {type(storage_options).__name__}",
                                        path=url, hint="pass S3 options such as {'endpoint_url': ...}")
        self._raise_failed()
        plain, attr_dicts = _strip_attribute_dicts(checkpoint)
        state = dict_state(plain, {}, lazy=self._background_ok() if self.async_save else None, where=url)
        step = checkpoint.get("global_step")
        kwargs: dict[str, Any] = dict(
            step=step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None,
            overwrite=True, allow_pickle=self.allow_pickle, process_group=False,
            storage_options={**self.storage_options, **(storage_options or {})},
            metadata={META: {"keys": list(plain), "attribute_dicts": attr_dicts}})
        snap = self._snapshotter()
        if self.async_save:
            self._handles.append(snap.save_async(state, url, **kwargs))
        else:
            snap.save(state, url, **kwargs)

    def _background_ok(self) -> Callable[[torch.Tensor], bool]:
        """Which tensors an asynchronous save may copy after the call: those that only
        an optimizer step changes (parameters, optimizer state of the optimizers the hook
        has seen step), since that step waits for the copy."""
        owned = optimizer_storages(list(self._optimizers))
        return lambda t: _storage(t) in owned

    def load_checkpoint(self, path: str | os.PathLike[str], map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        url = os.fspath(path)
        self._wait(url)
        out, meta = load_dict(url, META, allow_pickle=self.allow_pickle and not weights_only,
                              storage_options=self.storage_options)
        for where in meta.get("attribute_dicts") or []:
            _restore_attribute_dict(out, where)
        if map_location is not None:
            out = _move(out, map_location, url)
        return out

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        if _global_rank() != 0:
            return
        url = os.fspath(path)
        self._wait(url)
        if "://" not in url and os.path.isfile(url):  # a file another CheckpointIO wrote
            os.remove(url)
            return
        delete_checkpoint(url, self.storage_options)

    def teardown(self) -> None:
        """Waits for the save in flight; raises the first failure nobody has seen."""
        self._wait(None)
        self._raise_failed()

    def _wait(self, url: str | None) -> None:
        for h in list(self._handles):
            if url is None or _same(h.url, url):
                h.exception()

    def _raise_failed(self) -> None:
        done = [h for h in self._handles if h.done()]
        self._handles = [h for h in self._handles if not h.done()]
        for h in done:
            err = h.exception()
            if err is not None:
                raise err


def _wait_at_exit(ref: weakref.ref[CkptCheckpointIO]) -> None:
    me = ref()
    if me is not None:
        for h in me._handles:
            err = h.exception()
            if err is not None:
                log.error("ckpt: a checkpoint save failed before the process exited: %s", err)
        me._handles = []


def _global_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _same(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(a) == os.path.abspath(b)


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return -1


def _strip_attribute_dicts(obj: Any, where: list[Any] | None = None,
                           found: list[list[Any]] | None = None) -> tuple[Any, list[list[Any]]]:
    """``obj`` with every Lightning ``AttributeDict`` (a dict subclass: pickle otherwise)
    as a plain dict, and the key paths where they were (JSON: str/int keys only).
    Containers are copied only where something changed."""
    where = [] if where is None else where
    found = [] if found is None else found
    if isinstance(obj, AttributeDict):
        if all(isinstance(k, str | int) and not isinstance(k, bool) for k in where):
            found.append(list(where))
        obj = dict(obj)
    if isinstance(obj, dict) and type(obj).__module__ in ("builtins", "collections"):
        new = {k: _strip_attribute_dicts(v, where + [k], found)[0] for k, v in obj.items()}
        if any(new[k] is not v for k, v in obj.items()):
            return new, found
    elif type(obj) in (list, tuple):
        items = [_strip_attribute_dicts(v, where + [i], found)[0] for i, v in enumerate(obj)]
        if any(n is not v for n, v in zip(items, obj)):
            return type(obj)(items), found
    return obj, found


def _restore_attribute_dict(root: Any, where: list[Any]) -> None:
    if not where:
        return
    parent = root
    try:
        for k in where[:-1]:
            parent = parent[k]
        if isinstance(parent[where[-1]], dict):
            parent[where[-1]] = AttributeDict(parent[where[-1]])
    except (KeyError, IndexError, TypeError):
        pass  # the value changed shape since the save: leave it a dict


def _move(obj: Any, map_location: Any, url: str) -> Any:
    if not isinstance(map_location, str | torch.device):
        raise UnsupportedStateError(
            f"map_location {map_location!r} is not supported", path=url,
            hint="pass None (tensors load on the CPU), a torch.device or a device string")
    if isinstance(obj, torch.Tensor):
        return obj.to(map_location)
    if isinstance(obj, dict):
        return type(obj)({k: _move(v, map_location, url) for k, v in obj.items()})
    if type(obj) in (list, tuple):
        return type(obj)(_move(v, map_location, url) for v in obj)
    return obj
