"""Every error ckpt raises.

Each class subclasses both :class:`CheckpointError` and the builtin that fits, so
``except FileNotFoundError`` keeps working for callers who do not know ckpt. Messages
name the key, the path and what to do about it; raise them through the keyword
constructor so they always do.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "CheckpointError",
    "UnsupportedOperationError",
    "CheckpointNotFoundError",
    "CheckpointExistsError",
    "IncompleteCheckpointError",
    "ManifestError",
    "FormatVersionError",
    "CorruptCheckpointError",
    "MissingKeyError",
    "UnexpectedKeyError",
    "ShapeMismatchError",
    "DtypeMismatchError",
    "UnsupportedDtypeError",
    "UnsupportedStateError",
    "PickleNotAllowedError",
    "UnsafePathError",
    "UnknownURLSchemeError",
    "MissingDependencyError",
    "StorageError",
    "StorageFullError",
    "StoragePermissionError",
    "SnapshotFailedError",
    "DistributedSaveError",
    "ReshardError",
    "SaveInProgressError",
    "ConfigError",
    "InsufficientMemoryError",
    "NotADirectoryPathError",
]


class CheckpointError(Exception):
    """Base class of every ckpt error.

    ``key`` is the state key concerned (if any), ``path`` the checkpoint or object
    concerned (if any), ``hint`` what the user can do.
    """

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        path: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.key = key
        self.path = path
        self.hint = hint
        parts = [message]
        if key is not None:
            parts.append(f"key: {key!r}")
        if path is not None:
            parts.append(f"path: {path}")
        if hint:
            parts.append(f"fix: {hint}")
        self.message = message
        super().__init__("; ".join(parts))
        self.path = path  # again: ImportError.__init__ (MissingDependencyError) resets .path to None

    def __reduce__(self):  # keeps errors picklable across processes
        return (_rebuild, (type(self), self.message, self.key, self.path, self.hint))


def _rebuild(cls, message, key, path, hint):
    return cls(message, key=key, path=path, hint=hint)


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint where one was expected."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint already exists at the target and overwrite was not asked for."""


class IncompleteCheckpointError(CheckpointError, FileNotFoundError):
    """Data is there but the manifest is not: a save that never committed."""


class ManifestError(CheckpointError, ValueError):
    """manifest.json is unreadable, fails its checksum, or breaks the format's rules."""


class FormatVersionError(ManifestError):
    """The checkpoint was written by a newer, incompatible format version."""


class CorruptCheckpointError(CheckpointError, OSError):
    """Stored bytes fail their checksum, are truncated or are missing."""


class MissingKeyError(CheckpointError, KeyError):
    """The state asks for a key that the checkpoint does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return Exception.__str__(self)


class UnexpectedKeyError(CheckpointError, KeyError):
    """The checkpoint holds keys that the state does not have (strict load)."""

    def __str__(self) -> str:
        return Exception.__str__(self)


class ShapeMismatchError(CheckpointError, ValueError):
    """A saved tensor's global shape differs from the one being loaded into."""


class DtypeMismatchError(CheckpointError, TypeError):
    """A saved tensor's dtype differs from the one being loaded into."""


class UnsupportedDtypeError(CheckpointError, TypeError):
    """A tensor dtype the format cannot store."""


class UnsupportedStateError(CheckpointError, TypeError):
    """An object in the state that no provider knows how to describe."""


class PickleNotAllowedError(CheckpointError, TypeError):
    """A value needs pickle, and allow_pickle was not set."""


class UnsafePathError(CheckpointError, ValueError):
    """A key or a manifest path would reach outside the checkpoint."""


class UnknownURLSchemeError(CheckpointError, ValueError):
    """A URL whose scheme has no registered storage backend."""


class MissingDependencyError(CheckpointError, ImportError):
    """An optional dependency is needed for this operation."""


class StorageError(CheckpointError, OSError):
    """The storage backend failed to read, write, list or delete."""


class StorageFullError(StorageError):
    """The storage ran out of space."""


class StoragePermissionError(StorageError, PermissionError):
    """The storage refused access."""


class UnsupportedOperationError(StorageError, NotImplementedError):
    """The storage backend cannot do this at all (e.g. an atomic rename on S3)."""


class SnapshotFailedError(CheckpointError, RuntimeError):
    """A background snapshot failed; ``__cause__`` holds the original exception."""


class DistributedSaveError(CheckpointError, RuntimeError):
    """One or more ranks failed a collective save or load.

    ``failures`` maps each failing rank to its exception (or its formatted text when
    the exception could not travel between processes).
    """

    def __init__(
        self,
        message: str,
        *,
        failures: Mapping[int, BaseException | str] | None = None,
        key: str | None = None,
        path: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.failures = dict(failures or {})
        detail = "; ".join(f"rank {r}: {e!r}" for r, e in sorted(self.failures.items()))
        super().__init__(f"{message} ({detail})" if detail else message, key=key, path=path, hint=hint)

    def __reduce__(self):
        return (DistributedSaveError, (self.message,), {"failures": {r: repr(e) for r, e in self.failures.items()}})


class ReshardError(CheckpointError, ValueError):
    """The saved pieces cannot produce the requested layout (gaps, overlaps, bad boxes)."""


class SaveInProgressError(CheckpointError, RuntimeError):
    """A snapshot was requested while the previous one is still running, with policy 'error'."""


class ConfigError(CheckpointError, ValueError):
    """A setting (a ``CKPT_*`` environment variable) has a value ckpt cannot use."""


class InsufficientMemoryError(CheckpointError, MemoryError):
    """A saved tensor is larger than this host can allocate (or a damaged manifest says so)."""


class NotADirectoryPathError(CheckpointError, NotADirectoryError):
    """A run or checkpoint location that exists and is a file, not a directory."""
