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
  (``CKPT_S3_MULTIPART_THRESHOLD``, 256 MiB) uses a multipart upload of ``part_bytes``
  parts (``CKPT_S3_PART_BYTES``, 64 MiB), ``upload_concurrency`` at a time
  (``CKPT_S3_UPLOAD_CONCURRENCY``, 8): see :mod:`ckpt.storage._s3_multipart`.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from ckpt import _config as config
from ckpt.errors import MissingDependencyError, StorageError, StoragePermissionError
from ckpt.storage._base import Capabilities, ObjectInfo, Storage
from ckpt.storage._s3_client import make_fs
from ckpt.storage._s3_errors import (
    NOT_FOUND_CODES,
    PERMISSION_CODES,
    PRECONDITION_CODES,
    brief,
    error_code,
    is_timeout,
    no_bucket,
    retryable,
    translate,
)
from ckpt.storage._s3_multipart import multipart_upload
from ckpt.storage._s3_settings import resolve_settings
from ckpt.storage._s3_tensorstore import credentials_spec, custom_endpoint, s3_context, ts_retries

__all__ = ["S3Storage"]

_BACKOFF_BASE_S = 0.1
_BACKOFF_CAP_S = 10.0
log = logging.getLogger("ckpt.storage.s3")
_DELETE_BATCH = 1000  # S3's limit for one DeleteObjects


def _dirs_of(keys: list[str], base: str) -> set[str]:
    """The directory keys (``a/b/``) between ``base`` (included) and each of ``keys``."""
    out = {base}
    for k in keys:
        parts = k[len(base):].split("/")[:-1]
        out.update(base + "/".join(parts[:i]) + "/" for i in range(1, len(parts) + 1))
    return out


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
    ``settings`` is all of it resolved once (:class:`~ckpt.storage._s3_settings.S3Settings`);
    the helpers take that value and :meth:`request`, never the storage.
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
                                         path=f"s3://{bucket}", hint="pip install 'ckpt-torch[s3]'")
        if (key is None) != (secret is None):
            raise ValueError("S3Storage needs both key= and secret= (or neither, to use the "
                             "environment or a profile)")
        if token is not None and key is None:
            raise ValueError("S3Storage token= needs key= and secret= as well")
        self.settings = resolve_settings(
            bucket, prefix, endpoint_url=endpoint_url, region=region, key=key, secret=secret, token=token,
            profile=profile, anon=anon, client_kwargs=client_kwargs, deadline_s=deadline_s,
            max_attempts=max_attempts, retry_mode=retry_mode, part_bytes=part_bytes,
            multipart_threshold=multipart_threshold, upload_concurrency=upload_concurrency,
            s3fs_options=s3fs_options)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = self.settings.url
        self.stats = {"retries": 0, "multipart_uploads": 0, "aborted_uploads": 0}
        self._fs: Any = None
        self._bucket_seen = False
        self._lock = threading.Lock()

    # -- settings (read-only views of ``self.settings``) -------------------------
    @property
    def endpoint_url(self) -> str | None:
        return self.settings.endpoint_url

    @property
    def region(self) -> str | None:
        return self.settings.region

    @property
    def profile(self) -> str | None:
        return self.settings.profile

    @property
    def anon(self) -> bool:
        return self.settings.anon

    @property
    def deadline_s(self) -> float:
        return self.settings.deadline_s

    @property
    def max_attempts(self) -> int:
        return self.settings.max_attempts

    @property
    def retry_mode(self) -> str:
        return self.settings.retry_mode

    @property
    def part_bytes(self) -> int:
        return self.settings.part_bytes

    @property
    def multipart_threshold(self) -> int:
        return self.settings.multipart_threshold

    @property
    def upload_concurrency(self) -> int:
        return self.settings.upload_concurrency

    # -- the s3fs file system --------------------------------------------------
    @property
    def fs(self) -> Any:
        """The underlying :class:`s3fs.S3FileSystem` (created on first use)."""
        if self._fs is None:
            with self._lock:
                if self._fs is None:
                    self._fs = make_fs(self.settings)
        return self._fs

    def _full(self, key: str) -> str:
        return f"{self.bucket}/{key}"

    def _object_key(self, path: str) -> str:
        return self.join(self.prefix, path)

    def _dir_key(self, path: str) -> str:
        k = self._object_key(path)
        return k + "/" if k else ""

    def _rel(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    def request(self, method: str, what: str, path: str, *, deadline: float | None = None,
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
                              self.scrub(brief(e)), tries, delay)
                    time.sleep(delay)
                    continue
                if not translate:
                    raise
                if retryable(e) or timed_out:
                    elapsed = time.monotonic() - start
                    why = (f"no success within the deadline of {self.deadline_s:g} s"
                           if timed_out or tries < self.max_attempts else f"{tries} rounds of tries failed")
                    last = ("the endpoint did not answer in time, refused connections or kept failing"
                            if is_timeout(e) else self.scrub(brief(e)))
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
            self.request("put_object", "writing", path, Key=key, Body=body)
        else:
            # A multipart object appears whole when the upload completes (as one PUT).
            multipart_upload(self.settings, self.request, key, body, path, self.stats)
        self.fs.invalidate_cache(self._full(key))

    def create_bytes(self, path: str, data: bytes | memoryview) -> None:
        """A conditional PUT (``If-None-Match: *``): atomic on servers that honour it
        (AWS S3, SeaweedFS, moto); others write regardless, and the commit's read-back
        tells. An object that large goes by a check and a multipart upload instead."""
        body = data if isinstance(data, bytes) else bytes(data)
        if len(body) >= self.multipart_threshold:
            return super().create_bytes(path, body)
        try:
            self.request("put_object", "creating", path, Key=self._object_key(path), Body=body, IfNoneMatch="*")
        except Exception as e:
            if error_code(e) not in PRECONDITION_CODES:
                raise
            if self.read_bytes(path) != body:  # not our own earlier try, answered late
                raise FileExistsError(17, "an object exists here", self.describe(path)) from None

    def exists(self, path: str) -> bool:
        key = self._object_key(path)
        if key:
            try:
                self.request("head_object", "checking", path, Key=key)
                return True
            except FileNotFoundError:
                pass
        resp = self.request("list_objects_v2", "listing", path, Prefix=self._dir_key(path), MaxKeys=1)
        return bool(resp.get("Contents") or resp.get("CommonPrefixes"))

    def size(self, path: str) -> int:
        try:
            head = self.request("head_object", "reading the size of", path, Key=self._object_key(path))
        except FileNotFoundError as e:
            self._check_bucket(path)
            raise e
        return int(head["ContentLength"])

    # -- listing and deletion ---------------------------------------------------
    def _pages(self, path: str, **kwargs: Any) -> Any:
        kwargs["Prefix"] = self._dir_key(path)
        while True:
            resp = self.request("list_objects_v2", "listing", path, **kwargs)
            yield resp
            if not resp.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = resp["NextContinuationToken"]

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Sub-directories that hold objects. Servers backed by a file system (SeaweedFS)
        list a directory whose objects were all deleted as a common prefix until the
        directory itself is deleted, so each one is confirmed by a one-key listing."""
        base = self._dir_key(prefix)
        names = {p["Prefix"][len(base):].rstrip("/")
                 for resp in self._pages(prefix, Delimiter="/")
                 for p in resp.get("CommonPrefixes", [])}
        names.discard("")
        found = sorted(names)
        if len(found) <= 1:
            held = [self._holds_objects(self.join(prefix, n)) for n in found]
        else:
            with concurrent.futures.ThreadPoolExecutor(min(16, len(found)), thread_name_prefix="ckpt-s3-ls") as pool:
                held = list(pool.map(lambda n: self._holds_objects(self.join(prefix, n)), found))
        return [n for n, h in zip(found, held) if h]

    def _holds_objects(self, path: str) -> bool:
        resp = self.request("list_objects_v2", "listing", path, Prefix=self._dir_key(path), MaxKeys=1)
        return bool(resp.get("Contents"))

    def list_files(self, prefix: str = "") -> list[ObjectInfo]:
        out = [ObjectInfo(self._rel(o["Key"]), int(o["Size"]))
               for resp in self._pages(prefix)
               for o in resp.get("Contents", [])
               if not o["Key"].endswith("/")]  # "folder" markers made by consoles
        return sorted(out, key=lambda o: o.path)

    def delete(self, path: str) -> None:
        key = self._object_key(path)
        self.request("delete_object", "deleting", path, Key=key)
        self.fs.invalidate_cache(self._full(key))

    def delete_dir(self, prefix: str) -> None:
        if not prefix.strip("/"):
            raise StorageError("refusing to delete the storage root", path=self.url,
                               hint="delete the run's sub-directories one by one")
        keys = [o["Key"] for resp in self._pages(prefix) for o in resp.get("Contents", [])]
        if keys:  # then the directories (deepest first) that file-system-backed servers keep
            keys += sorted(_dirs_of(keys, self._dir_key(prefix)), key=lambda k: -k.count("/"))
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i:i + _DELETE_BATCH]
            resp = self.request("delete_objects", "deleting", prefix,
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
        if self.settings.s3fs_options.get("requester_pays"):
            spec["requester_pays"] = True
        spec["aws_credentials"] = self._ts_credentials()
        return spec

    def ts_context(self) -> Any:
        """The tensorstore Context for this storage's arrays: one per process and
        configuration. Retries are derived from ``deadline_s``: exponential backoff from
        200 ms up to ``max_delay``, as many retries as fit in the deadline."""
        initial, max_delay, retries = ts_retries(self.deadline_s)
        retries = int(config.read("CKPT_S3_RETRIES") or retries)
        return s3_context(int(config.read("CKPT_S3_CONCURRENCY")), max(1, retries),
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
        st = self.settings
        return credentials_spec(anon=st.anon, key=st.key.value if st.key else None,
                                secret=st.secret.value if st.secret else None,
                                token=st.token.value if st.token else None, profile=st.profile)

    # -- errors -----------------------------------------------------------------
    def _check_bucket(self, path: str) -> None:
        """Raise a clear error if the bucket itself is missing (a HEAD cannot tell)."""
        if self._bucket_seen:
            return
        try:
            self.request("head_bucket", "checking", path)
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
                         scrub=self.scrub)

    def scrub(self, text: str) -> str:
        """``text`` without credentials (see :meth:`S3Settings.scrub`)."""
        return self.settings.scrub(text)

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


