"""Local S3 servers for the tests, and the fixtures that hand out places in it.

By default every S3 test runs twice: against a moto server in this process (a mock, the
way s3fs's own tests run it) and against SeaweedFS (a real object store with an S3
gateway, :mod:`tests._seaweedfs`), each started once per session on 127.0.0.1 on free
ports, and every test gets a fresh bucket. ``CKPT_TEST_S3_SERVERS`` (comma-separated:
``moto``, ``seaweedfs``) picks a subset. To run the same tests against a real S3-compatible endpoint instead, set
``CKPT_TEST_S3_ENDPOINT`` (and ``CKPT_TEST_S3_BUCKET``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` as needed): each test then works under a unique
prefix of that bucket (or of a fresh bucket when no bucket is given) and cleans it up.

For moto runs the environment holds dummy credentials only, the shared AWS config
files are hidden and instance metadata is disabled, so no request leaves 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

__all__ = ["s3_server", "s3_url", "s3_options", "S3Server", "server", "server_params", "stop_servers",
           "fresh_place"]

ENDPOINT_VAR = "CKPT_TEST_S3_ENDPOINT"
BUCKET_VAR = "CKPT_TEST_S3_BUCKET"
SERVERS_VAR = "CKPT_TEST_S3_SERVERS"
SERVERS = ("moto", "seaweedfs")
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
    kind: str = "moto"  # "moto", "seaweedfs" or "external"

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``S3Storage`` / ``open_storage`` that reach this server."""
        opts: dict[str, Any] = {"endpoint_url": self.endpoint_url, "region": self.region}
        if self.key and self.secret:
            opts.update(key=self.key, secret=self.secret)
        return opts

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.key, aws_secret_access_key=self.secret,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )


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


def server_params() -> list[str]:
    """The S3 servers this session runs S3 tests on (CKPT_TEST_S3_SERVERS, or external)."""
    if os.environ.get(ENDPOINT_VAR):
        return ["external"]
    chosen = [k.strip() for k in os.environ.get(SERVERS_VAR, ",".join(SERVERS)).split(",") if k.strip()]
    unknown = sorted(set(chosen) - set(SERVERS))
    if unknown:
        raise ValueError(f"{SERVERS_VAR}={os.environ[SERVERS_VAR]!r}: unknown server(s) {unknown}; "
                         f"choose from {', '.join(SERVERS)}")
    return chosen


_running: dict[str, tuple[S3Server, Any]] = {}  # kind -> (server, its stop function)
_env_patch = pytest.MonkeyPatch()


def server(kind: str, tmp_path_factory: pytest.TempPathFactory) -> S3Server:
    """The S3 server of ``kind`` (moto, seaweedfs or external), started on first use and
    kept for the session: one instance per kind, stopped by :func:`stop_servers`."""
    if kind in _running:
        return _running[kind][0]
    pytest.importorskip("s3fs")
    pytest.importorskip("boto3")
    _env_patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    stop: Any = None
    if kind == "external":
        srv = S3Server(
            endpoint_url=os.environ[ENDPOINT_VAR].rstrip("/"),
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            key=os.environ.get("AWS_ACCESS_KEY_ID"),
            secret=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            bucket=os.environ.get(BUCKET_VAR) or None,
            external=True, kind="external",
        )
    elif kind == "seaweedfs":
        from tests._seaweedfs import SeaweedFS

        _moto_env(_env_patch)
        weed = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), DUMMY_KEY, DUMMY_SECRET).start()
        stop = weed.stop
        srv = S3Server(endpoint_url=weed.endpoint_url, region="us-east-1", key=DUMMY_KEY,
                       secret=DUMMY_SECRET, bucket=None, external=False, kind="seaweedfs")
    else:
        pytest.importorskip("moto")
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer

        _moto_env(_env_patch)
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        stop = moto.stop
        host, port = moto.get_host_and_port()
        assert host == "127.0.0.1", host
        srv = S3Server(endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1",
                       key=DUMMY_KEY, secret=DUMMY_SECRET, bucket=None, external=False)
    _running[kind] = (srv, stop)
    return srv


def stop_servers() -> None:
    """Stop every server :func:`server` started (the session's end)."""
    for _srv, stop in _running.values():
        if stop is not None:
            stop()
    _running.clear()
    _env_patch.undo()


@pytest.fixture(scope="session", params=server_params())
def s3_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> S3Server:
    """The S3 endpoint of a test: moto, then SeaweedFS, on 127.0.0.1 (or the endpoint that
    CKPT_TEST_S3_ENDPOINT names)."""
    return server(request.param, tmp_path_factory)


@contextlib.contextmanager
def fresh_place(srv: S3Server) -> Iterator[str]:
    """``s3://bucket/prefix`` on ``srv``: an empty place of its own, emptied afterwards."""
    client = srv.client()
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    bucket = srv.bucket
    created = bucket is None
    if bucket is None:
        bucket = f"ckpt-test-{uuid.uuid4().hex[:16]}"
        extra = ({} if srv.region == "us-east-1"
                 else {"CreateBucketConfiguration": {"LocationConstraint": srv.region}})
        client.create_bucket(Bucket=bucket, **extra)
        _wait_for_bucket(client, bucket)
    try:
        yield f"s3://{bucket}/{prefix}"
    finally:
        _empty(client, bucket, "" if created else prefix + "/")
        if created:
            client.delete_bucket(Bucket=bucket)


@pytest.fixture
def s3_url(s3_server: S3Server) -> Iterator[str]:
    """``s3://bucket/prefix``: an empty place of its own for one test."""
    with fresh_place(s3_server) as url:
        yield url


@pytest.fixture
def s3_options(s3_server: S3Server) -> dict[str, Any]:
    """The storage options of this test's server (the one ``s3_url`` is on)."""
    return s3_server.storage_options()


def _wait_for_bucket(client: Any, bucket: str, timeout_s: float = 30.0) -> None:
    """Until a new bucket takes writes. SeaweedFS's gateway learns of a bucket from the
    filer's metadata stream, so under load a PUT right after CreateBucket can still get
    NoSuchBucket for a moment (AWS and moto: at once)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.put_object(Bucket=bucket, Key=".ready", Body=b"")
            client.delete_object(Bucket=bucket, Key=".ready")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _empty(client: Any, bucket: str, prefix: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
