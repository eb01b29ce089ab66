"""URL -> Storage. Backends are imported lazily, so a missing optional dependency only
matters to the URLs that need it (with an install hint)."""

from __future__ import annotations

import importlib
import os
import posixpath
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ckpt.errors import MissingDependencyError, UnknownURLSchemeError
from ckpt.storage._base import Storage

__all__ = ["open_storage", "register_storage", "split_checkpoint_url", "registered_schemes"]

Factory = Callable[..., Storage]

# scheme -> (module, attribute, pip extra needed or None)
_LAZY: dict[str, tuple[str, str, str | None]] = {
    "file": ("ckpt.storage._file", "FileStorage", None),
    "memory": ("ckpt.storage._memory", "MemoryStorage", None),
    "s3": ("ckpt.storage._s3", "S3Storage", "s3"),
}
_CUSTOM: dict[str, Factory] = {}


def register_storage(scheme: str, factory: Factory) -> None:
    """Make ``scheme://...`` URLs open with ``factory(url, **options)``."""
    _CUSTOM[scheme.lower()] = factory


def registered_schemes() -> list[str]:
    return sorted(set(_LAZY) | set(_CUSTOM))


def _load(scheme: str) -> Any:
    module, attr, extra = _LAZY[scheme]
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as e:
        if extra is None:
            raise
        raise MissingDependencyError(
            f"the {scheme}:// backend needs a package that is not installed ({e.name or e})",
            path=f"{scheme}://",
            hint=f"pip install 'ckpt-torch[{extra}]'",
        ) from e


def open_storage(url: str | os.PathLike[str], **options: Any) -> Storage:
    """Open the storage rooted at ``url``: a path, ``file://``, ``memory://`` or ``s3://``."""
    url = os.fspath(url)
    scheme = _scheme(url)
    if scheme in _CUSTOM:
        return _CUSTOM[scheme](url, **options)
    if scheme == "file":
        path = url[len("file://"):] if url.startswith("file://") else url
        return _load("file")(path or ".")
    if scheme == "memory":
        rest = url[len("memory://"):]
        name, _, prefix = rest.partition("/")
        return _load("memory")(name or "default", prefix)
    if scheme == "s3":
        parts = urlsplit(url)
        if not parts.netloc:
            raise UnknownURLSchemeError("an s3:// URL needs a bucket", path=url,
                                        hint="write s3://BUCKET/PREFIX")
        return _load("s3")(parts.netloc, parts.path.strip("/"), **options)
    raise UnknownURLSchemeError(
        f"no storage backend for scheme {scheme!r}", path=url,
        hint=f"use one of {', '.join(s + '://' for s in registered_schemes())} or a local path, "
             "or register one with ckpt.storage.register_storage",
    )


def _scheme(url: str) -> str:
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0].lower()


def split_checkpoint_url(url: str | os.PathLike[str], **options: Any) -> tuple[Storage, str]:
    """A checkpoint URL -> (storage rooted at its parent, the checkpoint's name)."""
    url = os.fspath(url).rstrip("/")
    scheme = _scheme(url)
    if scheme == "file" and "://" not in url:
        url = os.path.abspath(url)
    if scheme == "s3":
        parts = urlsplit(url)
        key = parts.path.strip("/")
        if not key:
            raise UnknownURLSchemeError("a checkpoint needs a name under the bucket", path=url,
                                        hint="write s3://BUCKET/RUN/step-000000100")
        parent, name = posixpath.split(key)
        return open_storage(f"s3://{parts.netloc}/{parent}", **options), name
    head, name = url.rsplit("/", 1) if "/" in url.split("://", 1)[-1] else (url.split("://")[0] + "://", url.split("://", 1)[-1])
    if not name:
        raise UnknownURLSchemeError("a checkpoint URL needs a name", path=url)
    return open_storage(head or "/", **options), name
