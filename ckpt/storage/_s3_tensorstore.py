"""tensorstore's side of S3 storage: its retry settings derived from ckpt's deadline, one
shared Context per configuration, the endpoint and credentials specs that match how the
s3fs side authenticates, and explicit keys handed over as a private profile (files in a
0700 directory, on /dev/shm where there is one, removed at exit)."""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import tempfile
import threading
from typing import Any

_AWS_HOST = re.compile(r"(^|\.)s3([.-][^/]*)?\.amazonaws\.com(\.cn)?$")


def custom_endpoint(resolved: str | None) -> str | None:
    """The endpoint botocore resolved, for tensorstore, unless it is AWS's own (which
    tensorstore derives itself from bucket and region)."""
    if resolved:
        host = resolved.split("://", 1)[-1].split("/", 1)[0]
        if not _AWS_HOST.search(host):
            return str(resolved).rstrip("/")
    return None


def credentials_spec(*, anon: bool, key: str | None, secret: str | None, token: str | None,
                     profile: str | None) -> dict[str, Any]:
    """tensorstore's ``aws_credentials`` for the way the storage authenticates:
    anonymous, explicit keys (as a private profile), a named profile, the environment,
    or AWS's default chain."""
    if anon:
        return {"type": "anonymous"}
    if key is not None and secret is not None:
        return private_profile(key, secret, token)
    if profile:
        home = os.path.expanduser("~")
        return {
            "type": "profile",
            "profile": profile,
            "credentials_file": os.environ.get("AWS_SHARED_CREDENTIALS_FILE")
            or os.path.join(home, ".aws", "credentials"),
            "config_file": os.environ.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config"),
        }
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return {"type": "environment"}
    return {"type": "default"}


def ts_retries(deadline_s: float) -> tuple[float, float, int]:
    """(initial_delay, max_delay, max_retries) for tensorstore: as many exponential
    backoffs (with tensorstore's jitter of up to ``initial_delay`` each) as fit in the
    deadline, at least one."""
    initial = 0.2
    max_delay = max(initial, min(20.0, deadline_s / 4))
    total, n = 0.0, 0
    while n < 64:
        step = min(initial * 2 ** n, max_delay) + initial
        if total + step > deadline_s:
            break
        total += step
        n += 1
    return initial, max_delay, max(1, n)


@functools.cache
def s3_context(concurrency: int, retries: int, initial_delay: float = 0.2, max_delay: float = 20.0) -> Any:
    """One tensorstore Context per process and configuration for S3 arrays: shared
    connection limits."""
    import tensorstore as ts

    return ts.Context({
        "s3_request_concurrency": {"limit": concurrency},
        "s3_request_retries": {"max_retries": retries, "initial_delay": f"{round(initial_delay * 1000)}ms",
                               "max_delay": f"{round(max_delay * 1000)}ms"},
        "data_copy_concurrency": {"limit": max(2, os.cpu_count() or 2)},
        "cache_pool": {"total_bytes_limit": 0},
    })


# -- explicit keys for tensorstore ------------------------------------------------------
_creds_lock = threading.Lock()
_creds_dirs: dict[tuple[str, str, str | None], tuple[str, int]] = {}
_creds_atexit = False


def private_profile(key: str, secret: str, token: str | None) -> dict[str, Any]:
    for v in (key, secret, token or ""):
        if any(c in v for c in "\r\n\0"):
            raise ValueError("S3 credentials must not contain line breaks or NUL characters")
    global _creds_atexit
    ident = (key, secret, token)
    with _creds_lock:
        d, pid = _creds_dirs.get(ident, ("", 0))
        if pid != os.getpid() or not os.path.isdir(d):  # a forked child makes its own
            shm = "/dev/shm"
            base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
            d = tempfile.mkdtemp(prefix="ckpt-s3-", dir=base)  # mode 0700
            text = f"[ckpt]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n"
            if token:
                text += f"aws_session_token = {token}\n"
            _write_private(os.path.join(d, "credentials"), text)
            _write_private(os.path.join(d, "config"), "")
            if not _creds_atexit:
                atexit.register(_remove_private_profiles)
                _creds_atexit = True
            _creds_dirs[ident] = (d, os.getpid())
    return {
        "type": "profile",
        "profile": "ckpt",
        "credentials_file": os.path.join(d, "credentials"),
        "config_file": os.path.join(d, "config"),
    }


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _remove_private_profiles() -> None:
    with _creds_lock:
        for ident, (d, pid) in list(_creds_dirs.items()):
            if pid == os.getpid():  # a forked child leaves its parent's files alone
                shutil.rmtree(d, ignore_errors=True)
                del _creds_dirs[ident]
