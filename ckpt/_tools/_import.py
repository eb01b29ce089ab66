"""``import``: a DCP checkpoint, a ``torch.save`` file or safetensors files -> a ckpt checkpoint.

The source is read whole into memory on CPU (as DCP's own ``dcp_to_torch_save`` does),
then written with ``ckpt.save``. Its nested dicts and lists become ``/``-separated keys:
``{"model": {"0.weight": t}}`` is stored under ``model/0.weight``, which is where a
module saved as ``{"model": model}`` keeps that parameter, so
``ckpt.load({"model": model}, url)`` loads it. Sub-trees without tensors are stored as
one plain value. Unpickling runs code, so torch.save files and DCP's non-tensor values
are read with ``weights_only`` unless ``allow_pickle``.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from ckpt._api import save
from ckpt._engine._confine import refuse_symlinks_under
from ckpt._format import parse_step_dirname, step_dirname
from ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    PickleNotAllowedError,
    UnsupportedStateError,
)
from ckpt.providers import Leaves, place
from ckpt.providers._leaves import flatten

FORMATS = ("auto", "dcp", "torch", "safetensors")
_INDEX_SUFFIX = ".safetensors.index.json"  # Hugging Face's sharded weights: {"weight_map": {name: file}}
_INDEX_GLOB = f"*{_INDEX_SUFFIX}"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6
_PICKLE_MAGIC = b"\x80"  # a pickle of protocol 2 or later: torch.save's legacy format


def detect_format(src: Path) -> str:
    if src.is_dir():
        if (src / ".metadata").is_file():
            return "dcp"
        if any(src.glob("*.safetensors")) or any(src.glob(_INDEX_GLOB)):
            return "safetensors"
        raise CheckpointNotFoundError("cannot tell the format of this directory: no DCP .metadata, no *.safetensors",
                                      path=str(src), hint="pass --format, or point at the checkpoint itself")
    if src.suffix == ".safetensors" or src.name.endswith(_INDEX_SUFFIX):
        return "safetensors"
    return "torch"


def _read_torch(src: Path, allow_pickle: bool) -> Any:
    with open(src, "rb") as f:
        head = f.read(4)
    if not head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):  # torch.save writes a zip (or a legacy pickle)
        raise UnsupportedStateError(f"the file is not a torch.save file (it starts with {head!r}, "
                                    f"neither a zip archive nor a pickle)", path=str(src),
                                    hint="import a torch.save file, a safetensors file or a DCP directory "
                                         "(--format names which)")
    try:
        try:
            obj = torch.load(src, map_location="cpu", weights_only=not allow_pickle, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(src, map_location="cpu", weights_only=not allow_pickle)  # legacy format
    except Exception as e:
        if not allow_pickle and "weights_only" in str(e):
            raise PickleNotAllowedError(f"the file holds objects that only a full unpickle can read "
                                        f"({_unpickle_reason(e)})",
                                        path=str(src), hint="pass --allow-pickle if you trust this file "
                                                            "(unpickling runs code)") from None
        raise
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    return obj


def _read_safetensors(src: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    index = src if src.name.endswith(_INDEX_SUFFIX) else None
    if src.is_dir():
        found = sorted(src.glob(_INDEX_GLOB))
        if len(found) > 1:
            raise CheckpointNotFoundError(f"the directory holds {len(found)} safetensors indexes "
                                          f"({', '.join(f.name for f in found)})", path=str(src),
                                          hint="point at the index file of the weights to import")
        index = found[0] if found else None
    if index is None:  # one file, or a directory of unindexed files: all of them
        out: dict[str, Any] = {}
        for f in sorted(src.glob("*.safetensors")) if src.is_dir() else [src]:
            out.update(load_file(str(f), device="cpu"))
        return out
    return _read_indexed(index, load_file)


def _read_indexed(index: Path, load_file: Any) -> dict[str, Any]:
    """The tensors ``index``'s weight_map names, each from the file it names (other files
    in the folder, e.g. a consolidated copy, are not read)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not a {name: file} object")
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"not a safetensors index ({e})", path=str(index),
                                     hint="a model.safetensors.index.json has {\"weight_map\": {name: file}}") from None
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    out: dict[str, Any] = {}
    for file, names in sorted(by_file.items()):
        path = index.parent / file
        if "/" in file or "\\" in file or file.startswith(".") or not path.is_file():
            raise CheckpointNotFoundError(f"the index names {file!r}, which is not a file beside it",
                                          path=str(path), hint="copy every shard the index lists next to it")
        tensors = load_file(str(path), device="cpu")
        missing = [n for n in names if n not in tensors]
        if missing:
            raise CorruptCheckpointError(f"{file} lacks {len(missing)} tensor(s) the index puts there, "
                                         f"e.g. {missing[0]!r}", path=str(path),
                                         hint="the shards do not match the index: re-download them")
        out.update((n, tensors[n]) for n in names)
    return out


def _read_dcp(src: Path, allow_pickle: bool) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(src))
    md = reader.read_metadata()
    sd: dict[str, Any] = {}
    for fqn, item in md.state_dict_metadata.items():
        value = torch.empty(item.size, dtype=item.properties.dtype) if isinstance(item, TensorStorageMetadata) else None
        place(sd, (md.planner_data or {}).get(fqn, (fqn,)), value)

    class _Planner(DefaultLoadPlanner):
        """Non-tensor values through ``weights_only`` unpickling unless pickle is allowed."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            try:
                obj = torch.load(value, weights_only=not allow_pickle)
            except Exception as e:
                if allow_pickle:
                    raise
                raise PickleNotAllowedError(f"a non-tensor value of the DCP checkpoint needs a full unpickle "
                                            f"({_unpickle_reason(e)})",
                                            key=fqn, path=str(src),
                                            hint="pass --allow-pickle if you trust this checkpoint") from None
            if self.flatten_state_dict:
                place(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    import warnings

    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        try:
            dcp.load(sd, storage_reader=reader, planner=_Planner(), no_dist=True)
        except CheckpointException as e:  # a BaseException that wraps the real error with its traceback
            first = next(iter(e.failures.values()), None)
            real = first[0] if isinstance(first, tuple) else first
            if isinstance(real, Exception):
                raise real from None
            raise CheckpointError(f"DCP could not read the checkpoint ({real!r})", path=str(src)) from None
    return sd


def _unpickle_reason(e: BaseException) -> str:
    """The one useful line of torch.load's long weights_only message."""
    m = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: Please use|\n|$)", str(e))
    return m.group(1).strip().rstrip(".") if m else str(e).splitlines()[0]


def import_(src: str | os.PathLike[str], run_or_ckpt_url: str | os.PathLike[str], format: str = "auto", *,
            step: int | None = None, prefix: str | None = None, allow_pickle: bool = False,
            overwrite: bool = False, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert ``src`` into a ckpt checkpoint.

    ``run_or_ckpt_url`` is the checkpoint's URL, or with ``step`` the run to write
    ``step-<step>`` into. ``prefix`` puts every key under it (``--prefix model`` turns a
    bare model state dict into ``model/...`` keys). Returns ``src``, ``format``,
    ``url``, ``tensors``, ``values``, ``bytes`` and ``seconds``.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown import format {format!r}; choose one of {', '.join(FORMATS)}")
    t0 = time.perf_counter()
    src_p = Path(os.fspath(src))
    if not src_p.exists():
        raise CheckpointNotFoundError("the source does not exist", path=str(src_p), hint="check the path")
    fmt = detect_format(src_p) if format == "auto" else format
    refuse_symlinks_under(src_p)  # a DCP directory: nothing read through a link inside it
    if fmt == "dcp":
        obj: Any = _read_dcp(src_p, allow_pickle)
    elif fmt == "safetensors":
        obj = _read_safetensors(src_p)
    else:
        obj = _read_torch(src_p, allow_pickle)
    optimizers: list[tuple[str, dict[str, Any]]] = []
    if fmt == "safetensors":  # flat names: "/" in a name is a path separator already
        leaves = [(k, v) for k, v in obj.items()]
        if prefix:
            leaves = [(f"{prefix.strip('/')}/{k}", v) for k, v in leaves]
    else:
        leaves = flatten(obj, prefix.strip("/") if prefix else "", optimizers)
    url = os.fspath(run_or_ckpt_url).rstrip("/")
    if step is not None:
        url = f"{url}/{step_dirname(step)}"
    else:
        step = parse_step_dirname(url.rsplit("/", 1)[-1])
    save({"import": Leaves(leaves, optimizers)}, url, step=step, overwrite=overwrite, allow_pickle=allow_pickle,
         storage_options=storage_options, metadata={"imported_from": str(src_p), "import_format": fmt})
    tensors = [v for _, v in leaves if isinstance(v, torch.Tensor)]
    tensors += [v for key, sd in optimizers for _, v in flatten(sd["state"], key) if isinstance(v, torch.Tensor)]
    return {"src": str(src_p), "format": fmt, "url": url, "tensors": len(tensors),
            "values": sum(not isinstance(v, torch.Tensor) for _, v in leaves) + len(optimizers),
            "bytes": sum(t.numel() * t.element_size() for t in tensors),
            "seconds": time.perf_counter() - t0}
