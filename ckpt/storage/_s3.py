"""S3 storage (``s3://bucket/prefix``): bytes through s3fs, array data through
tensorstore's own ``s3`` kvstore driver, both pointed at the same objects.

Configuration follows the AWS conventions, explicit arguments first:

- endpoint: ``endpoint_url=``, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``
  (both ignored when ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`` is true), else the one in
  the shared config file, else AWS itself;
- region: ``region=``, else ``AWS_REGION``, else ``AWS_DEFAULT_REGION``, else the
  shared config file;
- credentials: ``key=``/``secret=``/``token=``, else ``profile=``, else botocore's
  chain (``AWS_ACCESS_KEY_ID``…, ``AWS_PROFILE``, shared files, container and
  instance roles); ``anon=True`` sends unsigned requests.

There is no atomic rename on S3: a checkpoint commits by the single PUT of its
manifest (``write_bytes``), which readers see whole or not at all.

Secrets never appear in ``url``, ``repr``, ``describe``, log records or error messages.

Resilience (explicit arguments beat ``CKPT_S3_*`` environment variables, which beat
defaults):

- ``deadline_s`` (``CKPT_S3_DEADLINE_S``, 120): the most time one storage operation
  (a read, a PUT, a whole multipart upload, a listing page) may take, retries
  included; past it the operation fails with :class:`~ckpt.errors.StorageError`.
  Every attempt runs under the remaining time, so a hung connection cannot outlive it.
- ``max_attempts`` (``CKPT_S3_MAX_ATTEMPTS``, 5; or ``config_kwargs["retries"]``):
  botocore's own attempts per request (``retry_mode``, ``CKPT_S3_RETRY_MODE``:
  ``"standard"`` or ``"adaptive"``, which also rate-limits the client when throttled);
  around them ckpt runs up to as many rounds of its own, with exponential backoff and
  full jitter, for what botocore and s3fs leave: throttling (``SlowDown``, 503, 429),
  other 5xx, connection resets and refusals, timeouts, truncated bodies. Errors that
  retrying cannot fix (missing objects, permissions, a missing bucket) fail at once.
- Array data goes through tensorstore, whose ``s3_request_retries`` is derived from
  the same deadline (``initial_delay`` 200 ms doubling up to ``max_delay``, as many
  retries as fit in ``deadline_s``; ``CKPT_S3_RETRIES`` overrides the count).
  Tensorstore writes every object (one zarr shard or pack) with a single PUT and no
  multipart upload, so a shard must stay under S3's 5 GiB PUT limit: ckpt's
  ``max_shard_bytes`` (64 MiB by default) keeps it far below.
- ``write_bytes`` of objects from ``multipart_threshold`` bytes on
  (``CKPT_S3_MULTIPART_THRESHOLD``, 256 MiB) uses a multipart upload of
  ``part_bytes`` parts (``CKPT_S3_PART_BYTES``, 64 MiB; at least 5 MiB, grown to stay
  within 10 000 parts), ``upload_concurrency`` at a time
  (``CKPT_S3_UPLOAD_CONCURRENCY``, 8), each part retried on its own. An upload that
  fails is aborted, so no invisible parts are left to be billed; the object appears
  whole when the upload completes, or not at all.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from ckpt._config import parse_bytes, setting
from ckpt.errors import MissingDependencyError, StorageError, StoragePermissionError
from ckpt.storage._base import Capabilities, ObjectInfo, Storage
from ckpt.storage._s3_errors import (
    NOT_FOUND_CODES,
    PERMISSION_CODES,
    brief,
    error_code,
    is_timeout,
    no_bucket,
    retryable,
    translate,
)
from ckpt.storage._s3_tensorstore import credentials_spec, custom_endpoint, s3_context, ts_retries

__all__ = ["S3Storage"]

_MAX_PUT = 5 * 2**30  # S3's limit for one PUT
_MIN_PART = 5 * 2**20  # S3's smallest part (all but the last)
_MAX_PARTS = 10_000  # S3's most parts of one upload
_DEFAULT_DEADLINE_S = 120.0
_DEFAULT_MAX_ATTEMPTS = 5
_DEFAULT_PART_BYTES = 64 * 2**20
_DEFAULT_MULTIPART_THRESHOLD = 256 * 2**20
_DEFAULT_UPLOAD_CONCURRENCY = 8
_BACKOFF_BASE_S = 0.1
_BACKOFF_CAP_S = 10.0
log = logging.getLogger("ckpt.storage.s3")
_DELETE_BATCH = 1000  # S3's limit for one DeleteObjects


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class _Secret:
    """A credential value that does not show itself in repr, str or tracebacks' locals."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


class S3Storage(Storage):
    """Storage rooted at ``s3://bucket/prefix``.

    ``**s3fs_options`` go to :class:`s3fs.S3FileSystem` (``config_kwargs``,
    ``s3_additional_kwargs``, ``requester_pays``…). Its directory-listing cache is
    always off: ckpt lists right after it writes, and a stale listing would hide a
    checkpoint or show a deleted one.

    ``deadline_s``, ``max_attempts``, ``retry_mode``, ``part_bytes``,
    ``multipart_threshold`` and ``upload_concurrency`` set retries and multipart uploads
    (see the module's docstring; each has a ``CKPT_S3_*`` environment variable).
    ``stats`` counts ckpt's own retries, multipart uploads and aborted uploads.
    """

    capabilities = Capabilities(atomic_rename=False)

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        key: str | None = None,
        secret: str | None = None,
        token: str | None = None,
        profile: str | None = None,
        anon: bool = False,
        client_kwargs: dict[str, Any] | None = None,
        deadline_s: float | None = None,
        max_attempts: int | None = None,
        retry_mode: str | None = None,
        part_bytes: int | None = None,
        multipart_threshold: int | None = None,
        upload_concurrency: int | None = None,
        **s3fs_options: Any,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"not an S3 bucket name: {bucket!r} (write s3://BUCKET/PREFIX)")
        if importlib.util.find_spec("s3fs") is None:
            raise MissingDependencyError("the s3:// backend needs s3fs, which is not installed",
                                         path=f"s3://{bucket}", hint="pip install 'ckpt[s3]'")
        if (key is None) != (secret is None):
            raise ValueError("S3Storage needs both key= and secret= (or neither, to use the "
                             "environment or a profile)")
        if token is not None and key is None:
            raise ValueError("S3Storage token= needs key= and secret= as well")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")

        env = os.environ
        client_kwargs = dict(client_kwargs or {})
        endpoint_url = endpoint_url or client_kwargs.pop("endpoint_url", None)
        if endpoint_url is None and not _truthy(env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")):
            endpoint_url = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        region = region or client_kwargs.pop("region_name", None)
        region = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
        if region:
            client_kwargs["region_name"] = region
        self.endpoint_url = endpoint_url.rstrip("/") if endpoint_url else None
        self.region = region
        self.profile = profile
        self.anon = anon
        self._key = _Secret(key) if key is not None else None
        self._secret = _Secret(secret) if secret is not None else None
        self._token = _Secret(token) if token is not None else None
        self._client_kwargs = client_kwargs
        self._s3fs_options = s3fs_options

        self.deadline_s = float(setting("CKPT_S3_DEADLINE_S", _DEFAULT_DEADLINE_S, float, deadline_s))
        if not self.deadline_s > 0:
            raise ValueError(f"deadline_s must be positive, got {self.deadline_s}")
        user_retries = (s3fs_options.get("config_kwargs") or {}).get("retries") or {}
        if max_attempts is None and "max_attempts" in user_retries:
            max_attempts = int(user_retries["max_attempts"])
        self.max_attempts = int(setting("CKPT_S3_MAX_ATTEMPTS", _DEFAULT_MAX_ATTEMPTS, int, max_attempts))
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        mode = retry_mode or user_retries.get("mode")
        self.retry_mode = str(setting("CKPT_S3_RETRY_MODE", "standard", str, mode))
        if self.retry_mode not in ("standard", "adaptive", "legacy"):
            raise ValueError(f"retry_mode must be 'standard' or 'adaptive', got {self.retry_mode!r}")
        self.part_bytes = int(setting("CKPT_S3_PART_BYTES", _DEFAULT_PART_BYTES, parse_bytes, part_bytes))
        if not _MIN_PART <= self.part_bytes <= _MAX_PUT:
            raise ValueError(f"part_bytes must be between 5 MiB and 5 GiB (S3's limits), got {self.part_bytes}")
        self.multipart_threshold = int(setting("CKPT_S3_MULTIPART_THRESHOLD", _DEFAULT_MULTIPART_THRESHOLD, parse_bytes, multipart_threshold))
        self.multipart_threshold = min(max(self.multipart_threshold, self.part_bytes), _MAX_PUT)
        self.upload_concurrency = int(setting("CKPT_S3_UPLOAD_CONCURRENCY", _DEFAULT_UPLOAD_CONCURRENCY, int, upload_concurrency))
        if self.upload_concurrency < 1:
            raise ValueError(f"upload_concurrency must be >= 1, got {self.upload_concurrency}")
        self.stats = {"retries": 0, "multipart_uploads": 0, "aborted_uploads": 0}
        self._fs: Any = None
        self._bucket_seen = False
        self._lock = threading.Lock()

    # -- the s3fs file system --------------------------------------------------
    @property
    def fs(self) -> Any:
        """The underlying :class:`s3fs.S3FileSystem` (created on first use)."""
        if self._fs is None:
            with self._lock:
                if self._fs is None:
                    self._fs = self._make_fs()
        return self._fs

    def _make_fs(self) -> Any:
        try:
            import s3fs
        except ImportError as e:
            raise MissingDependencyError("the s3:// backend needs s3fs, which is not installed",
                                         path=self.url, hint="pip install 'ckpt[s3]'") from e
        opts = dict(self._s3fs_options)
        opts["use_listings_cache"] = False
        opts.setdefault("skip_instance_cache", True)  # no process-wide cache holding our keys
        config_kwargs = dict(opts.pop("config_kwargs", None) or {})
        # botocore retries each request itself (throttling, 5xx, connection errors);
        # ckpt's own loop (_retry) sits around it, bounded by the deadline.
        retries = dict(config_kwargs.get("retries") or {})
        retries.setdefault("mode", self.retry_mode)
        retries.setdefault("max_attempts", self.max_attempts)
        config_kwargs["retries"] = retries
        config_kwargs.setdefault("connect_timeout", min(10.0, self.deadline_s))
        config_kwargs.setdefault("read_timeout", min(60.0, self.deadline_s))
        config_kwargs.setdefault("max_pool_connections", max(10, self.upload_concurrency))
        opts.setdefault("default_block_size", self.part_bytes)
        opts.setdefault("max_concurrency", self.upload_concurrency)
        if self.endpoint_url:
            # S3-compatible servers (MinIO, moto, Ceph) want path-style requests; tensorstore
            # addresses a custom endpoint path-style too, so both agree.
            config_kwargs.setdefault("s3", {"addressing_style": "path"})
        if self.profile:
            opts["profile"] = self.profile
        fs = s3fs.S3FileSystem(
            anon=self.anon,
            endpoint_url=self.endpoint_url,
            key=self._key.value if self._key else None,
            secret=self._secret.value if self._secret else None,
            token=self._token.value if self._token else None,
            client_kwargs=dict(self._client_kwargs),
            config_kwargs=config_kwargs,
            **opts,
        )
        # s3fs's own retry loop (5 tries, fixed schedule, no deadline) would multiply
        # botocore's attempts and outlive the deadline: ckpt's loop replaces it.
        fs.retries = 1
        return fs

    def _full(self, key: str) -> str:
        return f"{self.bucket}/{key}"

    def _object_key(self, path: str) -> str:
        return self.join(self.prefix, path)

    def _dir_key(self, path: str) -> str:
        k = self._object_key(path)
        return k + "/" if k else ""

    def _rel(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    def _call(self, method: str, what: str, path: str, *, deadline: float | None = None,
              **kwargs: Any) -> Any:
        """One S3 request, retried until it succeeds, fails for good, or the deadline."""
        return self._retry(lambda timeout: self.fs.call_s3(method, Bucket=self.bucket, timeout=timeout, **kwargs),
                           what, path, deadline=deadline)

    def _retry(self, attempt: Callable[[float], Any], what: str, path: str, *,
               deadline: float | None = None, translate: bool = True) -> Any:
        """Run ``attempt(timeout)`` until it succeeds, with exponential backoff and full
        jitter between tries, at most ``max_attempts`` times and never past ``deadline``
        (``time.monotonic()``; default: ``deadline_s`` from now). Each try gets the time
        left as its timeout. Errors retrying cannot fix are raised at once."""
        start = time.monotonic()
        if deadline is None:
            deadline = start + self.deadline_s
        tries = 0
        while True:
            tries += 1
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError("no time left")
                return attempt(max(left, 0.05))
            except Exception as e:
                timed_out = is_timeout(e) or time.monotonic() >= deadline
                retry = retryable(e) and not timed_out and tries < self.max_attempts
                delay = random.uniform(0, min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** tries))
                if retry and time.monotonic() + delay < deadline:
                    self.stats["retries"] += 1
                    log.debug("S3 %s %s failed (%s), try %d; retrying in %.2f s", what, self.describe(path),
                              self._scrub(brief(e)), tries, delay)
                    time.sleep(delay)
                    continue
                if not translate:
                    raise
                if retryable(e) or timed_out:
                    elapsed = time.monotonic() - start
                    why = (f"no success within the deadline of {self.deadline_s:g} s"
                           if timed_out or tries < self.max_attempts else f"{tries} rounds of tries failed")
                    last = ("the endpoint did not answer in time, refused connections or kept failing"
                            if is_timeout(e) else self._scrub(brief(e)))
                    raise StorageError(
                        f"S3 request failed while {what}: {why} ({elapsed:.1f} s; {last})",
                        path=self.describe(path),
                        hint="check that the endpoint is up and reachable "
                             f"({self.endpoint_url or 'AWS'}); raise deadline_s= (CKPT_S3_DEADLINE_S) "
                             "or max_attempts= (CKPT_S3_MAX_ATTEMPTS) for a slow or throttled server; "
                             "retrying is safe") from e
                raise self._error(e, what, path) from e

    # -- bytes ----------------------------------------------------------------
    def read_bytes(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        if (start is not None and start < 0) or (end is not None and end < 0):
            raise ValueError(f"byte ranges are non-negative, got [{start}, {end})")
        first = start or 0
        if end is not None and end <= first:
            self.size(path)  # an empty range of a missing object is still missing
            return b""
        full = self._full(self._object_key(path))

        def attempt(timeout: float) -> bytes:
            try:
                if first == 0 and end is None:
                    return bytes(self.fs.cat_file(full, max_concurrency=1, timeout=timeout))
                return bytes(self.fs.cat_file(full, start=first, end=end, timeout=timeout))
            except Exception as e:
                if error_code(e) == "InvalidRange":  # the range starts at or past the end
                    return b""
                raise

        return self._retry(attempt, "reading", path)

    def write_bytes(self, path: str, data: bytes | memoryview) -> None:
        key = self._object_key(path)
        body = data if isinstance(data, bytes) else bytes(data)
        if len(body) < self.multipart_threshold:
            self._call("put_object", "writing", path, Key=key, Body=body)
        else:
            # S3 makes a multipart object visible whole when the upload completes, so
            # this is as atomic as one PUT (and the only way past 5 GiB).
            self._multipart_upload(key, body, path)
        self.fs.invalidate_cache(self._full(key))

    def _multipart_upload(self, key: str, body: bytes, path: str) -> None:
        deadline = time.monotonic() + self.deadline_s
        part = max(self.part_bytes, -(-len(body) // _MAX_PARTS))
        starts = list(range(0, len(body), part))
        mpu = self._call("create_multipart_upload", "starting a multipart upload of", path, Key=key,
                         deadline=deadline)
        upload_id = mpu["UploadId"]
        self.stats["multipart_uploads"] += 1
        failed = threading.Event()

        def put_part(i: int) -> dict[str, Any]:
            if failed.is_set():
                raise StorageError("another part of the upload failed", path=self.describe(path))
            chunk = body[starts[i]:starts[i] + part]
            out = self._call("upload_part", f"uploading part {i + 1}/{len(starts)} of", path, Key=key,
                             UploadId=upload_id, PartNumber=i + 1, Body=chunk, deadline=deadline)
            return {"PartNumber": i + 1, "ETag": out["ETag"]}

        try:
            with concurrent.futures.ThreadPoolExecutor(min(self.upload_concurrency, len(starts)),
                                                       thread_name_prefix="ckpt-s3-part") as pool:
                futures = [pool.submit(put_part, i) for i in range(len(starts))]
                try:
                    parts = [f.result() for f in futures]
                except BaseException:
                    failed.set()
                    for f in futures:
                        f.cancel()
                    raise
            try:
                self._call("complete_multipart_upload", "completing the multipart upload of", path, Key=key,
                           UploadId=upload_id, MultipartUpload={"Parts": parts}, deadline=deadline)
            except Exception as e:
                # A retried completion whose first try succeeded finds the upload gone:
                # the object is there, whole, if its size and part count say so.
                if error_code(e) != "NoSuchUpload" or not self._completed(key, len(body), len(parts)):
                    raise
        except BaseException:
            self._abort(key, upload_id, path)
            raise

    def _completed(self, key: str, size: int, nparts: int) -> bool:
        try:
            head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=key)
        except Exception:
            return False
        return int(head.get("ContentLength", -1)) == size and str(head.get("ETag", "")).strip('"').endswith(
            f"-{nparts}")

    def _abort(self, key: str, upload_id: str, path: str) -> None:
        """Abort a failed multipart upload (its parts would otherwise stay, billed and
        invisible); best effort, with a short deadline of its own."""
        try:
            self._call("abort_multipart_upload", "aborting the multipart upload of", path, Key=key,
                       UploadId=upload_id, deadline=time.monotonic() + min(30.0, self.deadline_s))
            self.stats["aborted_uploads"] += 1
        except Exception as e:  # noqa: BLE001 - the upload's own error is the one to raise
            if error_code(e) == "NoSuchUpload":
                self.stats["aborted_uploads"] += 1
                return
            log.warning("could not abort the multipart upload of %s (%s); a bucket lifecycle rule "
                        "(AbortIncompleteMultipartUpload) removes it later", self.describe(path),
                        self._scrub(brief(e)))

    def exists(self, path: str) -> bool:
        key = self._object_key(path)
        if key:
            try:
                self._call("head_object", "checking", path, Key=key)
                return True
            except FileNotFoundError:
                pass
        resp = self._call("list_objects_v2", "listing", path, Prefix=self._dir_key(path), MaxKeys=1)
        return bool(resp.get("Contents") or resp.get("CommonPrefixes"))

    def size(self, path: str) -> int:
        try:
            head = self._call("head_object", "reading the size of", path, Key=self._object_key(path))
        except FileNotFoundError as e:
            self._check_bucket(path)
            raise e
        return int(head["ContentLength"])

    # -- listing and deletion ---------------------------------------------------
    def _pages(self, path: str, **kwargs: Any) -> Any:
        kwargs["Prefix"] = self._dir_key(path)
        while True:
            resp = self._call("list_objects_v2", "listing", path, **kwargs)
            yield resp
            if not resp.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = resp["NextContinuationToken"]

    def list_dirs(self, prefix: str = "") -> list[str]:
        base = self._dir_key(prefix)
        names = {p["Prefix"][len(base):].rstrip("/")
                 for resp in self._pages(prefix, Delimiter="/")
                 for p in resp.get("CommonPrefixes", [])}
        names.discard("")
        return sorted(names)

    def list_files(self, prefix: str = "") -> list[ObjectInfo]:
        out = [ObjectInfo(self._rel(o["Key"]), int(o["Size"]))
               for resp in self._pages(prefix)
               for o in resp.get("Contents", [])
               if not o["Key"].endswith("/")]  # "folder" markers made by consoles
        return sorted(out, key=lambda o: o.path)

    def delete(self, path: str) -> None:
        key = self._object_key(path)
        self._call("delete_object", "deleting", path, Key=key)
        self.fs.invalidate_cache(self._full(key))

    def delete_dir(self, prefix: str) -> None:
        if not prefix.strip("/"):
            raise StorageError("refusing to delete the storage root", path=self.url,
                               hint="delete the run's sub-directories one by one")
        keys = [o["Key"] for resp in self._pages(prefix) for o in resp.get("Contents", [])]
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i:i + _DELETE_BATCH]
            resp = self._call("delete_objects", "deleting", prefix,
                              Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            failed = resp.get("Errors") or []
            if failed:
                first = failed[0]
                where = self.describe(self._rel(first.get("Key", "")))
                msg = f"{len(failed)} object(s) were not deleted (first: {first.get('Code')})"
                if first.get("Code") in PERMISSION_CODES:
                    raise StoragePermissionError(msg, path=where, hint="check s3:DeleteObject permission")
                raise StorageError(msg, path=where, hint="retry; deleting is idempotent")
        self.fs.invalidate_cache(self._full(self._object_key(prefix)))

    # -- tensorstore --------------------------------------------------------------
    def kvstore_spec(self, path: str) -> dict[str, Any]:
        """The tensorstore ``s3`` kvstore spec of the directory ``path``.

        Credentials are passed as a ``Context.aws_credentials`` resource that matches
        how this storage authenticates: ``anonymous`` for ``anon=True``; ``profile`` for
        ``profile=``; ``environment`` when ``AWS_ACCESS_KEY_ID`` is set; otherwise
        ``default`` (AWS's chain). Tensorstore cannot take a key and secret in its spec,
        so explicit ``key=``/``secret=`` are written once per process to a private
        credentials file (``/dev/shm`` when available, mode 0600 in a 0700 directory,
        removed at exit) and named by a ``profile`` credentials spec: the spec itself
        holds no secret, and no other code sees them through the process environment.
        Credential sources that only botocore knows (SSO, ``credential_process``,
        role assumption in profiles) need the keys exported or passed explicitly.
        """
        spec: dict[str, Any] = {"driver": "s3", "bucket": self.bucket, "path": self._dir_key(path)}
        endpoint = self._ts_endpoint()
        if endpoint:
            spec["endpoint"] = endpoint
        region = self.region or self._config_region()
        if region:
            spec["aws_region"] = region
        if self._s3fs_options.get("requester_pays"):
            spec["requester_pays"] = True
        spec["aws_credentials"] = self._ts_credentials()
        return spec

    def ts_context(self) -> Any:
        """The tensorstore Context for this storage's arrays: one per process and
        configuration. Retries are derived from ``deadline_s``: exponential backoff from
        200 ms up to ``max_delay``, as many retries as fit in the deadline."""
        initial, max_delay, retries = ts_retries(self.deadline_s)
        retries = int(setting("CKPT_S3_RETRIES", retries, int, None))
        return s3_context(setting("CKPT_S3_CONCURRENCY", 32, int), max(1, retries),
                           initial, max_delay)

    def _ts_endpoint(self) -> str | None:
        if self.endpoint_url:
            return self.endpoint_url
        # An endpoint from the shared config file: botocore knows it, tensorstore does not.
        return custom_endpoint(getattr(getattr(self.fs.s3, "meta", None), "endpoint_url", None))

    def _config_region(self) -> str | None:
        try:
            self.fs.connect()
            return self.fs.session.get_config_variable("region") or None
        except Exception:
            return None

    def _ts_credentials(self) -> dict[str, Any]:
        return credentials_spec(anon=self.anon, key=self._key.value if self._key else None,
                                secret=self._secret.value if self._secret else None,
                                token=self._token.value if self._token else None, profile=self.profile)

    # -- errors -----------------------------------------------------------------
    def _check_bucket(self, path: str) -> None:
        """Raise a clear error if the bucket itself is missing (a HEAD cannot tell)."""
        if self._bucket_seen:
            return
        try:
            self._call("head_bucket", "checking", path)
        except Exception as e:
            if isinstance(e, FileNotFoundError) or error_code(e) in NOT_FOUND_CODES | {"NoSuchBucket"} or (
                    isinstance(e, StorageError) and "does not exist" in str(e)):
                raise self._no_bucket("checking", path) from e
            return  # e.g. no s3:ListBucket permission: leave it to the caller's error
        self._bucket_seen = True

    def _no_bucket(self, what: str, path: str) -> StorageError:
        return no_bucket(self.bucket, self.endpoint_url, what, self.describe(path))

    def _error(self, exc: BaseException, what: str, path: str) -> Exception:
        """Translate an s3fs/botocore error into the builtin or ckpt error it means."""
        return translate(exc, what, self.describe(path), bucket=self.bucket, endpoint_url=self.endpoint_url,
                         scrub=self._scrub)

    def _scrub(self, text: str) -> str:
        for s in (self._secret, self._token, self._key):
            if s is not None and s.value:
                text = text.replace(s.value, "***")
        for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
            v = os.environ.get(var)
            if v and len(v) >= 4:
                text = text.replace(v, "***")
        return text

    # -- lifecycle ----------------------------------------------------------------
    def close(self) -> None:
        self._fs = None  # s3fs closes its client when the file system is collected

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


