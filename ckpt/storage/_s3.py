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

Secrets never appear in ``url``, ``repr``, ``describe`` or error messages.
"""

from __future__ import annotations

import atexit
import errno
import functools
import importlib.util
import os
import re
import shutil
import tempfile
import threading
from typing import Any

from ckpt.errors import MissingDependencyError, StorageError, StoragePermissionError
from ckpt.storage._base import Capabilities, ObjectInfo, Storage

__all__ = ["S3Storage"]

_MAX_PUT = 5 * 2**30  # S3's limit for one PUT
_DELETE_BATCH = 1000  # S3's limit for one DeleteObjects
_AWS_HOST = re.compile(r"(^|\.)s3([.-][^/]*)?\.amazonaws\.com(\.cn)?$")
_PERMISSION_CODES = {
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AccountProblem", "403",
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                      "ProfileNotFound", "UnauthorizedSSOTokenError", "TokenRetrievalError"}


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
        if self.endpoint_url:
            # S3-compatible servers (MinIO, moto, Ceph) want path-style requests; tensorstore
            # addresses a custom endpoint path-style too, so both agree.
            config_kwargs.setdefault("s3", {"addressing_style": "path"})
        if self.profile:
            opts["profile"] = self.profile
        return s3fs.S3FileSystem(
            anon=self.anon,
            endpoint_url=self.endpoint_url,
            key=self._key.value if self._key else None,
            secret=self._secret.value if self._secret else None,
            token=self._token.value if self._token else None,
            client_kwargs=dict(self._client_kwargs),
            config_kwargs=config_kwargs,
            **opts,
        )

    def _full(self, key: str) -> str:
        return f"{self.bucket}/{key}"

    def _object_key(self, path: str) -> str:
        return self.join(self.prefix, path)

    def _dir_key(self, path: str) -> str:
        k = self._object_key(path)
        return k + "/" if k else ""

    def _rel(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    def _call(self, method: str, what: str, path: str, **kwargs: Any) -> Any:
        try:
            return self.fs.call_s3(method, Bucket=self.bucket, **kwargs)
        except Exception as e:
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
        try:
            if first == 0 and end is None:
                return self.fs.cat_file(full, max_concurrency=1)
            return self.fs.cat_file(full, start=first, end=end)
        except Exception as e:
            if _code(e) == "InvalidRange":  # the range starts at or past the end
                return b""
            raise self._error(e, "reading", path) from e

    def write_bytes(self, path: str, data: bytes | memoryview) -> None:
        key = self._object_key(path)
        body = data if isinstance(data, bytes) else bytes(data)
        if len(body) < _MAX_PUT:
            self._call("put_object", "writing", path, Key=key, Body=body)
        else:
            # Past one PUT's limit a multipart upload is the only way; S3 makes the
            # object visible whole when the upload completes, so it is atomic too.
            try:
                self.fs.pipe_file(self._full(key), body)
            except Exception as e:
                raise self._error(e, "writing", path) from e
        self.fs.invalidate_cache(self._full(key))

    def exists(self, path: str) -> bool:
        key = self._object_key(path)
        if key:
            try:
                self.fs.call_s3("head_object", Bucket=self.bucket, Key=key)
                return True
            except Exception as e:
                err = self._error(e, "checking", path)
                if not isinstance(err, FileNotFoundError):
                    raise err from e
        resp = self._call("list_objects_v2", "listing", path, Prefix=self._dir_key(path), MaxKeys=1)
        return bool(resp.get("Contents") or resp.get("CommonPrefixes"))

    def size(self, path: str) -> int:
        try:
            head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self._object_key(path))
        except Exception as e:
            err = self._error(e, "reading the size of", path)
            if isinstance(err, FileNotFoundError):
                self._check_bucket(path)
            raise err from e
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
                if first.get("Code") in _PERMISSION_CODES:
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
        return _s3_context(int(os.environ.get("CKPT_S3_CONCURRENCY", "32")),
                           int(os.environ.get("CKPT_S3_RETRIES", "10")))

    def _ts_endpoint(self) -> str | None:
        if self.endpoint_url:
            return self.endpoint_url
        # An endpoint from the shared config file: botocore knows it, tensorstore does not.
        resolved = getattr(getattr(self.fs.s3, "meta", None), "endpoint_url", None)
        if resolved:
            host = resolved.split("://", 1)[-1].split("/", 1)[0]
            if not _AWS_HOST.search(host):
                return str(resolved).rstrip("/")
        return None

    def _config_region(self) -> str | None:
        try:
            self.fs.connect()
            return self.fs.session.get_config_variable("region") or None
        except Exception:
            return None

    def _ts_credentials(self) -> dict[str, Any]:
        if self.anon:
            return {"type": "anonymous"}
        if self._key is not None and self._secret is not None:
            return _private_profile(self._key.value, self._secret.value,
                                    self._token.value if self._token else None)
        if self.profile:
            home = os.path.expanduser("~")
            return {
                "type": "profile",
                "profile": self.profile,
                "credentials_file": os.environ.get("AWS_SHARED_CREDENTIALS_FILE")
                or os.path.join(home, ".aws", "credentials"),
                "config_file": os.environ.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config"),
            }
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            return {"type": "environment"}
        return {"type": "default"}

    # -- errors -----------------------------------------------------------------
    def _check_bucket(self, path: str) -> None:
        """Raise a clear error if the bucket itself is missing (a HEAD cannot tell)."""
        if self._bucket_seen:
            return
        try:
            self.fs.call_s3("head_bucket", Bucket=self.bucket)
        except Exception as e:
            if isinstance(e, FileNotFoundError) or _code(e) in _NOT_FOUND_CODES | {"NoSuchBucket"}:
                raise self._no_bucket("checking", path) from e
            return  # e.g. no s3:ListBucket permission: leave it to the caller's error
        self._bucket_seen = True

    def _no_bucket(self, what: str, path: str) -> StorageError:
        return StorageError(
            f"bucket {self.bucket!r} does not exist (while {what})", path=self.describe(path),
            hint="create the bucket, or check the bucket name and the endpoint "
                 f"({self.endpoint_url or 'AWS'}; set by endpoint_url= or AWS_ENDPOINT_URL_S3)",
        )

    def _error(self, exc: BaseException, what: str, path: str) -> Exception:
        """Translate an s3fs/botocore error into the builtin or ckpt error it means."""
        code = _code(exc)
        where = self.describe(path)
        if code == "NoSuchBucket":
            return self._no_bucket(what, path)
        if code in _NOT_FOUND_CODES or (code is None and isinstance(exc, FileNotFoundError)):
            return FileNotFoundError(errno.ENOENT, "no such object", where)
        names = {t.__name__ for t in type(exc).__mro__}
        if code in _PERMISSION_CODES or names & _CREDENTIAL_ERRORS or isinstance(exc, PermissionError):
            detail = code or type(exc).__name__
            return StoragePermissionError(
                f"S3 refused access while {what} ({detail})", path=where,
                hint="check the credentials (key=/secret=, AWS_ACCESS_KEY_ID, AWS_PROFILE) "
                     "and the bucket's policy",
            )
        text = self._scrub(str(exc)) or type(exc).__name__
        return StorageError(f"S3 request failed while {what}: {text}", path=where,
                            hint="check the endpoint and the network; retrying is safe")

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


def _code(exc: BaseException | None) -> str | None:
    """The S3 error code of a botocore ClientError anywhere in ``exc``'s chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        resp = getattr(exc, "response", None)
        if isinstance(resp, dict):
            code = resp.get("Error", {}).get("Code")
            if code:
                return str(code)
        exc = exc.__cause__ or exc.__context__
    return None


@functools.cache
def _s3_context(concurrency: int, retries: int) -> Any:
    """One tensorstore Context per process for S3 arrays: shared connection limits."""
    import tensorstore as ts

    return ts.Context({
        "s3_request_concurrency": {"limit": concurrency},
        "s3_request_retries": {"max_retries": retries, "initial_delay": "200ms", "max_delay": "20s"},
        "data_copy_concurrency": {"limit": max(2, os.cpu_count() or 2)},
        "cache_pool": {"total_bytes_limit": 0},
    })


# -- explicit keys for tensorstore ------------------------------------------------------
_creds_lock = threading.Lock()
_creds_dirs: dict[tuple[str, str, str | None], tuple[str, int]] = {}
_creds_atexit = False


def _private_profile(key: str, secret: str, token: str | None) -> dict[str, Any]:
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
