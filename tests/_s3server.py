"""A local S3 server for the tests, and the fixtures that hand out places in it.

By default a moto server runs in this process for the whole session, bound to
127.0.0.1 on a free port (the way s3fs's own tests run it), and every test gets a fresh
bucket. To run the same tests against a real S3-compatible endpoint instead, set
``CKPT_TEST_S3_ENDPOINT`` (and ``CKPT_TEST_S3_BUCKET``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` as needed): each test then works under a unique
prefix of that bucket (or of a fresh bucket when no bucket is given) and cleans it up.

For moto runs the environment holds dummy credentials only, the shared AWS config
files are hidden and instance metadata is disabled, so no request leaves 127.0.0.1.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

__all__ = ["s3_server", "s3_url", "s3_options", "s3_storage_options", "S3Server"]

ENDPOINT_VAR = "CKPT_TEST_S3_ENDPOINT"
BUCKET_VAR = "CKPT_TEST_S3_BUCKET"
DUMMY_KEY = "ckpt-test-key"
DUMMY_SECRET = "ckpt-test-secret"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    region: str
    key: str | None
    secret: str | None
    bucket: str | None  # a fixed bucket to work in (external endpoints only)
    external: bool

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.key, aws_secret_access_key=self.secret,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )


_current: S3Server | None = None


def s3_storage_options() -> dict[str, Any]:
    """Keyword arguments for ``S3Storage`` / ``open_storage`` that reach the test server."""
    if _current is None:
        raise RuntimeError("the S3 test server is not running: request the s3_url fixture first")
    opts: dict[str, Any] = {"endpoint_url": _current.endpoint_url, "region": _current.region}
    if _current.key and _current.secret:
        opts.update(key=_current.key, secret=_current.secret)
    return opts


def _moto_env(mp: pytest.MonkeyPatch) -> None:
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        mp.delenv(var, raising=False)
    mp.setenv("AWS_ACCESS_KEY_ID", DUMMY_KEY)
    mp.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET)
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("AWS_REGION", "us-east-1")
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    mp.setenv("AWS_CONFIG_FILE", os.devnull)
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    no_proxy = "127.0.0.1,localhost"
    mp.setenv("NO_PROXY", no_proxy)
    mp.setenv("no_proxy", no_proxy)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The S3 endpoint of this test session (moto on 127.0.0.1 unless overridden)."""
    global _current
    pytest.importorskip("s3fs")
    pytest.importorskip("boto3")
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    external = os.environ.get(ENDPOINT_VAR)
    server = None
    try:
        if external:
            _current = S3Server(
                endpoint_url=external.rstrip("/"),
                region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                key=os.environ.get("AWS_ACCESS_KEY_ID"),
                secret=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                bucket=os.environ.get(BUCKET_VAR) or None,
                external=True,
            )
        else:
            pytest.importorskip("moto")
            from moto.moto_server.threaded_moto_server import ThreadedMotoServer

            _moto_env(mp)
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            host, port = server.get_host_and_port()
            assert host == "127.0.0.1", host
            _current = S3Server(endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1",
                                key=DUMMY_KEY, secret=DUMMY_SECRET, bucket=None, external=False)
        yield _current
    finally:
        _current = None
        if server is not None:
            server.stop()
        mp.undo()


@pytest.fixture
def s3_url(s3_server: S3Server) -> Iterator[str]:
    """``s3://bucket/prefix``: an empty place of its own for one test."""
    client = s3_server.client()
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    bucket = s3_server.bucket
    created = bucket is None
    if bucket is None:
        bucket = f"ckpt-test-{uuid.uuid4().hex[:16]}"
        extra = ({} if s3_server.region == "us-east-1"
                 else {"CreateBucketConfiguration": {"LocationConstraint": s3_server.region}})
        client.create_bucket(Bucket=bucket, **extra)
    try:
        yield f"s3://{bucket}/{prefix}"
    finally:
        _empty(client, bucket, "" if created else prefix + "/")
        if created:
            client.delete_bucket(Bucket=bucket)


@pytest.fixture
def s3_options(s3_server: S3Server) -> dict[str, Any]:
    """:func:`s3_storage_options` as a fixture."""
    return s3_storage_options()


def _empty(client: Any, bucket: str, prefix: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
