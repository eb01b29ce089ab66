"""The S3 backend's client: the s3fs file system of an :class:`S3Settings`."""

from __future__ import annotations

from typing import Any

from ckpt.errors import MissingDependencyError
from ckpt.storage._s3_settings import S3Settings

__all__ = ["make_fs"]


def make_fs(st: S3Settings) -> Any:
    """The s3fs file system of ``st`` (with its options and credentials): no listing
    cache, botocore retrying each request under ckpt's deadline, path-style addressing
    for custom endpoints."""
    try:
        import s3fs
    except ImportError as e:
        raise MissingDependencyError("the s3:// backend needs s3fs, which is not installed",
                                     path=st.url, hint="pip install 'ckpt-torch[s3]'") from e
    opts = dict(st.s3fs_options)
    opts["use_listings_cache"] = False
    opts.setdefault("skip_instance_cache", True)  # no process-wide cache holding our keys
    config_kwargs = dict(opts.pop("config_kwargs", None) or {})
    # botocore retries each request itself (throttling, 5xx, connection errors);
    # ckpt's own loop (_retry) sits around it, bounded by the deadline.
    retries = dict(config_kwargs.get("retries") or {})
    retries.setdefault("mode", st.retry_mode)
    retries.setdefault("max_attempts", st.max_attempts)
    config_kwargs["retries"] = retries
    config_kwargs.setdefault("connect_timeout", min(10.0, st.deadline_s))
    config_kwargs.setdefault("read_timeout", min(60.0, st.deadline_s))
    config_kwargs.setdefault("max_pool_connections", max(10, st.upload_concurrency))
    opts.setdefault("default_block_size", st.part_bytes)
    opts.setdefault("max_concurrency", st.upload_concurrency)
    if st.endpoint_url:
        # S3-compatible servers (MinIO, moto, Ceph) want path-style requests; tensorstore
        # addresses a custom endpoint path-style too, so both agree.
        config_kwargs.setdefault("s3", {"addressing_style": "path"})
    if st.profile:
        opts["profile"] = st.profile
    key, secret, token = st.key, st.secret, st.token
    fs = s3fs.S3FileSystem(
        anon=st.anon,
        endpoint_url=st.endpoint_url,
        key=key.value if key else None,
        secret=secret.value if secret else None,
        token=token.value if token else None,
        client_kwargs=dict(st.client_kwargs),
        config_kwargs=config_kwargs,
        **opts,
    )
    # s3fs's own retry loop (5 tries, fixed schedule, no deadline) would multiply
    # botocore's attempts and outlive the deadline: ckpt's loop replaces it.
    fs.retries = 1
    return fs
