"""Plain values in a manifest: JSON, with a tagged form (``{"__ckpt__": tag, ...}``) for what
JSON cannot hold losslessly (tuples, int keys, inf/nan, bytes, dtypes, numpy numbers, paths,
argparse namespaces). docs/format.md §6 is the normative list of tags.
"""

from __future__ import annotations

import argparse
import math
import pathlib
from typing import Any

import torch

from ckpt.errors import ManifestError

TAG = "__ckpt__"


class NotJSONable(Exception):
    def __init__(self, obj: Any) -> None:
        self.obj = obj


def encode_value(obj: Any) -> Any:
    """A Python value -> JSON-compatible data that decodes to an equal value of the same
    types (tuples, int dict keys, inf/nan, bytes, torch dtypes survive). Raises
    NotJSONable for anything else (which then needs pickle)."""
    if type(obj).__module__ == "numpy":  # before int/float: np.float64 is a float, np.bool_ no bool
        return _encode_numpy_scalar(obj)
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return float(obj)
        return {TAG: "float", "v": repr(obj)}
    if isinstance(obj, list):
        return [encode_value(v) for v in obj]
    if isinstance(obj, tuple):
        if hasattr(obj, "_fields"):
            raise NotJSONable(obj)
        return {TAG: "tuple", "v": [encode_value(v) for v in obj]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and TAG not in obj and type(obj) is dict:
            return {k: encode_value(v) for k, v in obj.items()}
        if type(obj) is not dict:
            raise NotJSONable(obj)
        return {TAG: "dict", "v": [[encode_value(k), encode_value(v)] for k, v in obj.items()]}
    if isinstance(obj, bytes):
        import base64

        return {TAG: "bytes", "v": base64.b64encode(obj).decode()}
    if isinstance(obj, torch.dtype):
        return {TAG: "torch.dtype", "v": str(obj).removeprefix("torch.")}
    if isinstance(obj, set | frozenset):
        return {TAG: "set" if isinstance(obj, set) else "frozenset", "v": [encode_value(v) for v in obj]}
    if type(obj) in _PATH_TYPES:  # hyper-parameters: data dirs, output dirs
        return {TAG: "path", "type": type(obj).__name__, "v": str(obj)}
    if type(obj) is argparse.Namespace:  # hyper-parameters parsed from the command line
        return {TAG: "namespace", "v": encode_value(vars(obj))}
    raise NotJSONable(obj)


_PATH_TYPES = {pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.PosixPath, pathlib.WindowsPath}


def _decode_path(name: Any, v: Any) -> pathlib.PurePath:
    """A path of the saved class; a concrete path of another OS (a WindowsPath read on
    Linux) becomes the pure path of its flavour, which keeps its meaning."""
    cls = {"PurePosixPath": pathlib.PurePosixPath, "PureWindowsPath": pathlib.PureWindowsPath,
           "PosixPath": pathlib.PosixPath, "WindowsPath": pathlib.WindowsPath}.get(str(name))
    if cls is None or not isinstance(v, str):
        raise ManifestError(f"unknown path type {name!r} in a stored value",
                            hint="the checkpoint was written by a newer ckpt or is damaged")
    if cls in (pathlib.PosixPath, pathlib.WindowsPath) and cls is not type(pathlib.Path()):
        cls = pathlib.PurePosixPath if cls is pathlib.PosixPath else pathlib.PureWindowsPath
    return cls(v)


_NUMPY_KINDS = "biufc"  # bool, int, uint, float, complex: exact through Python numbers


def _encode_numpy_scalar(obj: Any) -> Any:
    """A numpy number (``np.float32(0.5)``, ``np.int64(3)``, ``np.bool_``) keeps its type:
    ``{"__ckpt__": "numpy", "dtype": "float32", "v": 0.5}``; a complex one stores
    ``[real, imag]``. Arrays, dates, strings and long doubles are not values."""
    import numpy as np

    if not isinstance(obj, np.generic):
        raise NotJSONable(obj)
    dt = obj.dtype
    if dt.kind not in _NUMPY_KINDS or dt.itemsize > (16 if dt.kind == "c" else 8) or dt.byteorder == ">":
        raise NotJSONable(obj)
    if dt.kind == "c":
        v: Any = [encode_value(float(obj.real)), encode_value(float(obj.imag))]
    else:
        v = encode_value(obj.item())
    return {TAG: "numpy", "dtype": dt.name, "v": v}


def _decode_numpy_scalar(name: Any, v: Any) -> Any:
    import numpy as np

    try:
        dt = np.dtype(str(name))
    except TypeError:
        dt = None
    if dt is None or dt.kind not in _NUMPY_KINDS:
        raise ManifestError(f"unknown numpy scalar type {name!r} in a stored value",
                            hint="the checkpoint was written by a newer ckpt or is damaged")
    if dt.kind == "c":
        re, im = (decode_value(x) for x in v)
        return dt.type(complex(re, im))
    return dt.type(decode_value(v))


def decode_value(data: Any) -> Any:
    if isinstance(data, list):
        return [decode_value(v) for v in data]
    if isinstance(data, dict):
        tag = data.get(TAG)
        if tag is None:
            return {k: decode_value(v) for k, v in data.items()}
        v = data.get("v")
        if tag == "float":
            return float(v)  # type: ignore[arg-type]
        if tag == "tuple":
            return tuple(decode_value(x) for x in v)  # type: ignore[union-attr]
        if tag == "dict":
            return {_hashable(decode_value(k)): decode_value(x) for k, x in v}  # type: ignore[union-attr]
        if tag == "bytes":
            import base64

            return base64.b64decode(v)  # type: ignore[arg-type]
        if tag == "torch.dtype":
            dt = getattr(torch, str(v), None)
            if not isinstance(dt, torch.dtype):
                raise ManifestError(f"unknown torch dtype {v!r} in a stored value")
            return dt
        if tag == "numpy":
            return _decode_numpy_scalar(data.get("dtype"), v)
        if tag == "path":
            return _decode_path(data.get("type"), v)
        if tag == "namespace":
            attrs = decode_value(v)
            if not isinstance(attrs, dict) or not all(isinstance(k, str) for k in attrs):
                raise ManifestError("a stored namespace is not a mapping of names",
                                    hint="the checkpoint is damaged")
            return argparse.Namespace(**attrs)
        if tag == "set":
            return {_hashable(decode_value(x)) for x in v}  # type: ignore[union-attr]
        if tag == "frozenset":
            return frozenset(_hashable(decode_value(x)) for x in v)  # type: ignore[union-attr]
        raise ManifestError(f"unknown value tag {tag!r} in the manifest",
                            hint="the checkpoint was written by a newer ckpt or is damaged")
    return data


def _hashable(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    return v
