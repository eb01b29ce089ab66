"""``export``: a checkpoint's tensors as consolidated safetensors or torch.save files.

Each global tensor is read whole (resharded from however many ranks wrote it) through
the same :class:`~ckpt._engine._load.Loader` that ``ckpt.load`` uses, so every chunk's
crc32c is checked. Output is cut into files of at most ``max_shard_bytes`` (a single
larger tensor gets a file of its own), with a Hugging Face style index when there is
more than one file; memory holds one output file's tensors at a time.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ckpt._engine._load import Loader
from ckpt._engine._recycle import reading
from ckpt._tools._common import Checkpoint, open_checkpoint, tensor_nbytes
from ckpt.errors import MissingKeyError, NotADirectoryPathError, UnsupportedDtypeError

Progress = Callable[[int, int], None]
FORMATS = ("safetensors", "torch")
_NAMES = {"safetensors": ("model", ".safetensors"), "torch": ("pytorch_model", ".bin")}
_SINGLE_SUFFIXES = {"safetensors": (".safetensors",), "torch": (".pt", ".pth", ".bin")}
_FILE_SUFFIXES = {".txt", ".json", ".pkl", ".npz", ".npy", ".h5", ".gguf", ".onnx", ".zip", ".tar", ".gz"}


def _check_directory_name(out: Path, format: str) -> None:
    """A name that reads as a file (``out.txt``, ``model.pt`` for safetensors) is a mistake,
    not a directory to create."""
    file_like = {x for xs in _SINGLE_SUFFIXES.values() for x in xs} | _FILE_SUFFIXES
    if out.is_file() or (not out.exists() and out.suffix.lower() in file_like):
        single = " or ".join(_SINGLE_SUFFIXES[format])
        raise NotADirectoryPathError(f"{format} export writes a directory here, or one file when the name ends "
                                     f"in {single}", path=str(out),
                                     hint=f"name a directory, or a file ending in {single} (--format picks the "
                                          f"format)")


def read_tensors(ck: Checkpoint, keys: list[str]) -> dict[str, torch.Tensor]:
    """The whole global tensors of ``keys`` (on CPU), read in one pass."""
    loader = Loader(ck.storage, ck.name, ck.manifest, strict=False)
    out = {k: loader.read_new(k) for k in keys}
    loader.execute()
    return out


def _selected(ck: Checkpoint, only: str | None) -> tuple[list[tuple[str, str]], list[str]]:
    """(key, exported name) of the tensors to export, and the keys skipped (values)."""
    prefix = only.strip("/") if only else ""
    names, skipped = [], []
    for key in sorted(ck.manifest.entries):
        if prefix and key != prefix and not key.startswith(prefix + "/"):
            continue
        if ck.manifest.entries[key]["kind"] != "tensor":
            skipped.append(key)
            continue
        name = key[len(prefix) + 1:] if prefix and key != prefix else key
        names.append((key, name or key.rsplit("/", 1)[-1]))
    if prefix and not names:
        raise MissingKeyError(f"no tensor key starts with {prefix!r}", key=prefix, path=ck.url,
                              hint="`ckpt info` lists the keys; --only takes a key prefix such as 'model'")
    return names, skipped


def _groups(ck: Checkpoint, names: list[tuple[str, str]], limit: int) -> list[list[tuple[str, str]]]:
    groups: list[list[tuple[str, str]]] = []
    size = 0
    for key, name in names:
        n = tensor_nbytes(ck.manifest.entries[key])
        if not groups or (size + n > limit and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append((key, name))
        size += n
    return groups


def _check_dtypes(ck: Checkpoint, names: list[tuple[str, str]], fmt: str) -> None:
    if fmt != "safetensors":
        return
    from safetensors.torch import _TYPES  # type: ignore[attr-defined]

    ok = {str(t).removeprefix("torch.") for t in _TYPES.values()}
    for key, _ in names:
        dt = ck.manifest.entries[key]["dtype"]
        if dt not in ok:
            raise UnsupportedDtypeError(f"safetensors cannot store dtype {dt}", key=key, path=ck.url,
                                        hint="export with --format torch, or leave this key out with --only")


def _hf_config(ck: Checkpoint) -> dict[str, Any] | None:
    """The model config a save through ``ckpt.integrations.hf`` stored (tied weights are
    then stored once, so the export has them once too, as ``save_pretrained`` writes)."""
    meta = ck.manifest.user_metadata.get("transformers")
    config = meta.get("config") if isinstance(meta, dict) else None
    return config if isinstance(config, dict) else None


def export(ckpt_url: str | os.PathLike[str], out: str | os.PathLike[str], format: str = "safetensors",
           only: str | None = None, max_shard_bytes: int = 5 << 30, progress: Progress | None = None, *,
           storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the tensors of a checkpoint to local files.

    ``out`` is a directory (created), or a single file when it ends in ``.safetensors``
    (safetensors) or ``.pt``/``.pth``/``.bin`` (torch). ``only`` keeps the keys under a
    prefix and strips it from the names (``model/0.weight`` -> ``0.weight``). A checkpoint
    that carries a Hugging Face model config (saved through ``ckpt.integrations.hf``)
    exports its ``model`` as safetensors plus ``config.json``: ``from_pretrained(out)``
    opens the directory. Plain
    values are not exported (listed in ``skipped``). Returns ``files``, ``tensors``,
    ``bytes``, ``skipped``, ``index`` (the index file or None) and ``seconds``.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    t0 = time.perf_counter()
    ck = open_checkpoint(ckpt_url, storage_options)
    with reading(ck.storage, ck.name):  # retention cannot recycle it under the export
        config = _hf_config(ck) if format == "safetensors" and only in (None, "model") else None
        if config is not None:
            only = "model"  # a model saved through ckpt.integrations.hf: the layout from_pretrained opens
        names, skipped = _selected(ck, only)
        _check_dtypes(ck, names, format)
        out_p = Path(os.fspath(out))
        single = out_p.suffix in _SINGLE_SUFFIXES[format]
        groups = [names] if single else _groups(ck, names, max(1, max_shard_bytes))
        base, ext = _NAMES[format]
        if single:
            out_p.parent.mkdir(parents=True, exist_ok=True)
            paths = [out_p]
        else:
            _check_directory_name(out_p, format)
            out_p.mkdir(parents=True, exist_ok=True)
            n = len(groups)
            paths = [out_p / (f"{base}{ext}" if n <= 1 else f"{base}-{i + 1:05d}-of-{n:05d}{ext}") for i in range(n)]
        total = sum(tensor_nbytes(ck.manifest.entries[k]) for k, _ in names)
        weight_map: dict[str, str] = {}
        meta = {"format": "pt", "ckpt.source": ck.url, "ckpt.step": str(ck.manifest.step)}
        for group, path in zip(groups, paths):
            tensors = read_tensors(ck, [k for k, _ in group])
            named = {name: tensors.pop(key) for key, name in group}
            if format == "safetensors":
                from safetensors.torch import save_file

                save_file(named, str(path), metadata=meta)
            else:
                torch.save(named, path)
            for name, t in named.items():
                weight_map[name] = path.name
                if progress is not None:
                    progress(t.numel() * t.element_size(), total)
            del named, tensors
        index = None
        if config is not None and not single:
            (out_p / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if len(paths) > 1:
            index = out_p / f"{base}{ext}.index.json"
            index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        files = [str(p) for p in paths] + ([str(out_p / "config.json")] if config is not None and not single else [])
        return {"src": ck.url, "format": format, "files": files, "tensors": len(names),
                "bytes": total, "skipped": skipped, "index": str(index) if index else None,
                "seconds": time.perf_counter() - t0}
