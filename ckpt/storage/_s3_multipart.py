"""Multipart upload of one large object (``S3Storage.write_bytes`` past its threshold).

It takes the storage's :class:`S3Settings` and its ``request`` callable (one S3 request,
retried under a deadline and translated into ckpt's errors), not the storage itself.
S3 makes a multipart object visible whole when the upload completes, so it is as atomic
as one PUT (and the only way past 5 GiB). Parts go up ``upload_concurrency`` at a time,
each retried on its own; an upload that fails is aborted, so no invisible parts are left
to be billed.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ckpt.errors import StorageError
from ckpt.storage._s3_errors import brief, error_code
from ckpt.storage._s3_settings import S3Settings

__all__ = ["multipart_upload", "Request"]

Request = Callable[..., Any]
"""``request(method, what, path, *, deadline=None, **kwargs)``: one S3 request on the
storage's bucket (``Bucket=`` is added), retried until it succeeds, fails for good or
the ``deadline`` (``time.monotonic()``) passes."""
_MAX_PARTS = 10_000  # S3's most parts of one upload
log = logging.getLogger("ckpt.storage.s3")


def multipart_upload(st: S3Settings, request: Request, key: str, body: bytes, path: str,
                     stats: dict[str, int]) -> None:
    """Upload ``body`` to ``key`` (``path`` names it in messages) in parts of at least
    ``st.part_bytes``; counts ``multipart_uploads`` and ``aborted_uploads`` in ``stats``."""
    deadline = time.monotonic() + st.deadline_s
    part = max(st.part_bytes, -(-len(body) // _MAX_PARTS))
    starts = list(range(0, len(body), part))
    mpu = request("create_multipart_upload", "starting a multipart upload of", path, Key=key,
                  deadline=deadline)
    upload_id = mpu["UploadId"]
    stats["multipart_uploads"] += 1
    failed = threading.Event()

    def put_part(i: int) -> dict[str, Any]:
        if failed.is_set():
            raise StorageError("another part of the upload failed", path=st.describe(path))
        chunk = body[starts[i]:starts[i] + part]
        out = request("upload_part", f"uploading part {i + 1}/{len(starts)} of", path, Key=key,
                      UploadId=upload_id, PartNumber=i + 1, Body=chunk, deadline=deadline)
        return {"PartNumber": i + 1, "ETag": out["ETag"]}

    try:
        with concurrent.futures.ThreadPoolExecutor(min(st.upload_concurrency, len(starts)),
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
            request("complete_multipart_upload", "completing the multipart upload of", path, Key=key,
                    UploadId=upload_id, MultipartUpload={"Parts": parts}, deadline=deadline)
        except Exception as e:
            # A retried completion whose first try succeeded finds the upload gone:
            # the object is there, whole, if its size and part count say so.
            if error_code(e) != "NoSuchUpload" or not _completed(st, request, key, path, len(body), len(parts)):
                raise
    except BaseException:
        _abort(st, request, key, upload_id, path, stats)
        raise

def _completed(st: S3Settings, request: Request, key: str, path: str, size: int, nparts: int) -> bool:
    """Whether ``key`` holds the whole upload (its size and part count); a short deadline
    of its own, since the upload's may be spent."""
    try:
        head = request("head_object", "checking the completed upload of", path, Key=key,
                       deadline=time.monotonic() + min(30.0, st.deadline_s))
    except Exception:
        return False
    return int(head.get("ContentLength", -1)) == size and str(head.get("ETag", "")).strip('"').endswith(
        f"-{nparts}")

def _abort(st: S3Settings, request: Request, key: str, upload_id: str, path: str,
           stats: dict[str, int]) -> None:
    """Abort a failed multipart upload (its parts would otherwise stay, billed and
    invisible); best effort, with a short deadline of its own."""
    try:
        request("abort_multipart_upload", "aborting the multipart upload of", path, Key=key,
                UploadId=upload_id, deadline=time.monotonic() + min(30.0, st.deadline_s))
        stats["aborted_uploads"] += 1
    except Exception as e:  # noqa: BLE001 - the upload's own error is the one to raise
        if error_code(e) == "NoSuchUpload":
            stats["aborted_uploads"] += 1
            return
        log.warning("could not abort the multipart upload of %s (%s); a bucket lifecycle rule "
                    "(AbortIncompleteMultipartUpload) removes it later", st.describe(path),
                    st.scrub(brief(e)))
