"""The S3 backend's settings: one frozen value, resolved once from ``S3Storage``'s
arguments, the AWS environment and ckpt's ``CKPT_S3_*`` knobs (:mod:`ckpt._config`).

The helpers (:mod:`._s3_client`, :mod:`._s3_multipart`) take this value and a request
callable, never the storage object, so they do not depend on :mod:`._s3`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ckpt import _config as config

__all__ = ["S3Settings", "Secret", "resolve_settings", "MAX_PUT", "MIN_PART"]

MAX_PUT = 5 * 2**30  # S3's limit for one PUT
MIN_PART = 5 * 2**20  # S3's smallest part (all but the last)


class Secret:
    """A credential value that does not show itself in repr, str or tracebacks' locals."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


@dataclass(frozen=True)
class S3Settings:
    """Where and how an :class:`~ckpt.storage.S3Storage` talks to S3 (see its module's
    docstring for each setting's sources). ``s3fs_options`` and ``client_kwargs`` are the
    caller's extra :class:`s3fs.S3FileSystem` options, with the endpoint and region
    taken out of ``client_kwargs``."""

    url: str
    bucket: str
    endpoint_url: str | None
    region: str | None
    profile: str | None
    anon: bool
    key: Secret | None
    secret: Secret | None
    token: Secret | None
    deadline_s: float
    max_attempts: int
    retry_mode: str
    part_bytes: int
    multipart_threshold: int
    upload_concurrency: int
    s3fs_options: dict[str, Any] = field(default_factory=dict)
    client_kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self, path: str = "") -> str:
        """The URL of ``path``, for messages (as :meth:`Storage.describe`)."""
        return f"{self.url}/{path}" if path else self.url

    def scrub(self, text: str) -> str:
        """``text`` with every credential (ours and the environment's) replaced by ``***``."""
        for s in (self.secret, self.token, self.key):
            if s is not None and s.value:
                text = text.replace(s.value, "***")
        for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
            v = os.environ.get(var)
            if v and len(v) >= 4:
                text = text.replace(v, "***")
        return text


def resolve_settings(
    bucket: str,
    prefix: str,
    *,
    endpoint_url: str | None,
    region: str | None,
    key: str | None,
    secret: str | None,
    token: str | None,
    profile: str | None,
    anon: bool,
    client_kwargs: dict[str, Any] | None,
    deadline_s: float | None,
    max_attempts: int | None,
    retry_mode: str | None,
    part_bytes: int | None,
    multipart_threshold: int | None,
    upload_concurrency: int | None,
    s3fs_options: dict[str, Any],
) -> S3Settings:
    """The settings of ``s3://bucket/prefix``: explicit arguments beat the environment,
    which beats the defaults; a value out of range raises :class:`ValueError`."""
    env = os.environ
    client_kwargs = dict(client_kwargs or {})
    endpoint_url = endpoint_url or client_kwargs.pop("endpoint_url", None)
    if endpoint_url is None and not config.env_flag("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        endpoint_url = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    region = region or client_kwargs.pop("region_name", None)
    region = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
    if region:
        client_kwargs["region_name"] = region

    deadline = float(config.read("CKPT_S3_DEADLINE_S", deadline_s))
    if not deadline > 0:
        raise ValueError(f"deadline_s must be positive, got {deadline}")
    user_retries = (s3fs_options.get("config_kwargs") or {}).get("retries") or {}
    if max_attempts is None and "max_attempts" in user_retries:
        max_attempts = int(user_retries["max_attempts"])
    attempts = int(config.read("CKPT_S3_MAX_ATTEMPTS", max_attempts))
    if attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {attempts}")
    mode = str(config.read("CKPT_S3_RETRY_MODE", retry_mode or user_retries.get("mode")))
    if mode not in ("standard", "adaptive", "legacy"):
        raise ValueError(f"retry_mode must be 'standard' or 'adaptive', got {mode!r}")
    part = int(config.read("CKPT_S3_PART_BYTES", part_bytes))
    if not MIN_PART <= part <= MAX_PUT:
        raise ValueError(f"part_bytes must be between 5 MiB and 5 GiB (S3's limits), got {part}")
    threshold = int(config.read("CKPT_S3_MULTIPART_THRESHOLD", multipart_threshold))
    concurrency = int(config.read("CKPT_S3_UPLOAD_CONCURRENCY", upload_concurrency))
    if concurrency < 1:
        raise ValueError(f"upload_concurrency must be >= 1, got {concurrency}")
    prefix = prefix.strip("/")
    return S3Settings(
        url=f"s3://{bucket}" + (f"/{prefix}" if prefix else ""),
        bucket=bucket,
        endpoint_url=endpoint_url.rstrip("/") if endpoint_url else None,
        region=region,
        profile=profile,
        anon=anon,
        key=Secret(key) if key is not None else None,
        secret=Secret(secret) if secret is not None else None,
        token=Secret(token) if token is not None else None,
        deadline_s=deadline,
        max_attempts=attempts,
        retry_mode=mode,
        part_bytes=part,
        multipart_threshold=min(max(threshold, part), MAX_PUT),
        upload_concurrency=concurrency,
        s3fs_options=s3fs_options,
        client_kwargs=client_kwargs,
    )
