"""The S3 backend against the storage contract, over HTTP to a local S3 server, and the
S3-specific promises: configuration sources, no secrets in text, clear errors."""

from __future__ import annotations

import http.server
import json
import os
import pickle
import stat
import sys
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import tensorstore as ts

from ckpt.errors import (
    CheckpointError,
    MissingDependencyError,
    StorageError,
    StoragePermissionError,
    UnknownURLSchemeError,
)
from ckpt.storage import open_storage, split_checkpoint_url
from ckpt.storage._s3 import S3Storage
from tests._s3server import S3Server
from tests.storage.conformance import StorageConformance

pytestmark = pytest.mark.s3

SECRET = "wJalrXUtnFEMI-K7MDENG-ckpt-test-SECRET"
TOKEN = "FwoGZXIvYXdzE-ckpt-test-TOKEN"
KEY_ID = "AKIACKPTTESTKEYID"


def _split(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.netloc, parts.path.strip("/")


class TestS3Storage(StorageConformance):
    @pytest.fixture
    def storage(self, s3_url: str, s3_options: dict[str, Any]) -> Iterator[S3Storage]:
        st = open_storage(s3_url, **s3_options)
        assert isinstance(st, S3Storage)
        yield st
        st.close()


# -- URLs ---------------------------------------------------------------------------------
def test_open_storage_parses_bucket_and_prefix(s3_options: dict[str, Any]) -> None:
    st = open_storage("s3://my-bucket/runs/exp1/", **s3_options)
    assert isinstance(st, S3Storage)
    assert (st.bucket, st.prefix, st.url) == ("my-bucket", "runs/exp1", "s3://my-bucket/runs/exp1")
    assert st.describe("step-1/manifest.json") == "s3://my-bucket/runs/exp1/step-1/manifest.json"
    assert st.kvstore_spec("step-1/w")["path"] == "runs/exp1/step-1/w/"
    root = open_storage("s3://my-bucket", **s3_options)
    assert (root.url, root.kvstore_spec("")["path"], root.kvstore_spec("a")["path"]) == (
        "s3://my-bucket", "", "a/")
    with pytest.raises(UnknownURLSchemeError):
        open_storage("s3:///no-bucket")


def test_split_checkpoint_url(s3_url: str, s3_options: dict[str, Any]) -> None:
    st, name = split_checkpoint_url(s3_url + "/run/step-000000100", **s3_options)
    assert name == "step-000000100"
    assert st.url == s3_url + "/run"
    st.write_bytes(f"{name}/manifest.json", b"{}")
    assert st.list_dirs() == [name]


def test_two_instances_see_each_others_changes(s3_url: str, s3_options: dict[str, Any]) -> None:
    a = open_storage(s3_url, **s3_options)
    b = open_storage(s3_url, **s3_options)
    assert b.list_dirs() == []
    a.write_bytes("step-1/manifest.json", b"{}")
    assert b.list_dirs() == ["step-1"]
    assert b.exists("step-1/manifest.json")
    a.delete_dir("step-1")
    assert b.list_dirs() == [] and not b.exists("step-1")


def test_prefixes_isolate_storages(s3_url: str, s3_options: dict[str, Any]) -> None:
    outer = open_storage(s3_url, **s3_options)
    inner = open_storage(s3_url + "/inner", **s3_options)
    inner.write_bytes("x.bin", b"1")
    outer.write_bytes("y.bin", b"2")
    assert [o.path for o in inner.list_files()] == ["x.bin"]
    assert [o.path for o in outer.list_files()] == ["inner/x.bin", "y.bin"]


def test_delete_dir_refuses_the_root(s3_url: str, s3_options: dict[str, Any]) -> None:
    st = open_storage(s3_url, **s3_options)
    st.write_bytes("keep.bin", b"1")
    with pytest.raises(StorageError):
        st.delete_dir("")
    assert st.exists("keep.bin")


# -- configuration ------------------------------------------------------------------------
def test_endpoint_and_region_from_the_environment(
    s3_url: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, prefix = _split(s3_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # loses to the _S3 one
    monkeypatch.setenv("AWS_REGION", s3_server.region)
    st = S3Storage(bucket, prefix)
    assert st.endpoint_url == s3_server.endpoint_url
    spec = st.kvstore_spec("arr")
    assert spec["endpoint"] == s3_server.endpoint_url
    assert spec["aws_region"] == s3_server.region
    st.write_bytes("env.bin", b"via env")
    assert st.read_bytes("env.bin") == b"via env"

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    assert S3Storage(bucket, prefix).read_bytes("env.bin") == b"via env"

    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert S3Storage(bucket, prefix).endpoint_url is None


def test_explicit_options_beat_the_environment(
    s3_url: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, prefix = _split(s3_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    st = S3Storage(bucket, prefix, endpoint_url=s3_server.endpoint_url, region=s3_server.region)
    assert (st.endpoint_url, st.region) == (s3_server.endpoint_url, s3_server.region)
    st.write_bytes("explicit.bin", b"ok")
    assert st.list_files()[0].path == "explicit.bin"
    spec = st.kvstore_spec("")
    assert (spec["endpoint"], spec["aws_region"]) == (s3_server.endpoint_url, s3_server.region)


def test_region_falls_back_to_aws_default_region(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert S3Storage("b", endpoint_url="http://127.0.0.1:1").region == "ap-south-1"
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    assert S3Storage("b", endpoint_url="http://127.0.0.1:1").region == "eu-west-3"


def test_settings_are_resolved_once_into_a_frozen_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """The helpers read one settings value: explicit arguments beat CKPT_S3_* variables,
    later changes of the environment do not reach a built storage, secrets stay hidden."""
    import dataclasses

    monkeypatch.setenv("CKPT_S3_DEADLINE_S", "7")
    monkeypatch.setenv("CKPT_S3_UPLOAD_CONCURRENCY", "3")
    st = S3Storage("b", "/p/", endpoint_url="http://127.0.0.1:1/", key=KEY_ID, secret=SECRET, upload_concurrency=5)
    s = st.settings
    assert (s.deadline_s, s.upload_concurrency, s.endpoint_url, s.url) == (7.0, 5, "http://127.0.0.1:1", "s3://b/p")
    monkeypatch.setenv("CKPT_S3_DEADLINE_S", "9")
    assert st.deadline_s == 7.0 and st.settings is s
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.deadline_s = 1.0  # type: ignore[misc]
    assert SECRET not in repr(s) and KEY_ID not in repr(s)
    assert s.scrub(f"denied for {KEY_ID}:{SECRET}") == "denied for ***:***"
    assert s.describe("step-1/manifest.json") == st.describe("step-1/manifest.json")


def test_tensorstore_credentials_follow_the_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = {"endpoint_url": "http://127.0.0.1:1", "region": "us-east-1"}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env-secret")
    assert S3Storage("b", **ep).kvstore_spec("x")["aws_credentials"] == {"type": "environment"}
    assert S3Storage("b", anon=True, **ep).kvstore_spec("x")["aws_credentials"] == {"type": "anonymous"}
    creds = S3Storage("b", profile="team", **ep).kvstore_spec("x")["aws_credentials"]
    assert (creds["type"], creds["profile"]) == ("profile", "team")
    explicit = S3Storage("b", key=KEY_ID, secret=SECRET, **ep).kvstore_spec("x")["aws_credentials"]
    assert explicit["type"] == "profile"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert S3Storage("b", **ep).kvstore_spec("x")["aws_credentials"] == {"type": "default"}


def test_explicit_keys_reach_tensorstore_without_the_environment(
    s3_url: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not (s3_server.key and s3_server.secret):
        pytest.skip("the test endpoint needs no keys")
    bucket, prefix = _split(s3_url)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    st = S3Storage(bucket, prefix, endpoint_url=s3_server.endpoint_url, region=s3_server.region,
                   key=s3_server.key, secret=s3_server.secret)
    spec = st.kvstore_spec("arr")
    creds = spec["aws_credentials"]
    mode = stat.S_IMODE(os.stat(creds["credentials_file"]).st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(creds["credentials_file"])).st_mode) == 0o700
    assert s3_server.secret not in json.dumps(spec).split('"')  # no value is the secret
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    arr = ts.open({"driver": "zarr3", "kvstore": spec}, context=st.ts_context(), create=True,
                  dtype=ts.float32, shape=data.shape).result()
    arr.write(data).result()
    assert st.exists("arr/zarr.json")
    np.testing.assert_array_equal(arr.read().result(), data)
    # Same keys, same private file: one per credential set and process.
    again = S3Storage(bucket, prefix, endpoint_url=s3_server.endpoint_url,
                      key=s3_server.key, secret=s3_server.secret)
    assert again.kvstore_spec("arr")["aws_credentials"] == creds


def test_tensorstore_signs_with_the_explicit_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # moto accepts any signature, so check what tensorstore sends on a server that records it.
    seen: list[dict[str, str]] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            seen.append({k.lower(): v for k, v in self.headers.items()} | {":path": self.path})
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        st = S3Storage("bkt", "run", endpoint_url=f"http://127.0.0.1:{server.server_port}",
                       region="us-east-1", key=KEY_ID, secret=SECRET, token=TOKEN)
        kv = ts.KvStore.open(st.kvstore_spec("arr"), context=st.ts_context()).result()
        assert kv.read("zarr.json").result().state == "missing"
    finally:
        server.shutdown()
        thread.join()
    assert seen, "tensorstore sent no request"
    auth = seen[0]["authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256") and f"Credential={KEY_ID}/" in auth
    assert seen[0]["x-amz-security-token"] == TOKEN
    # Path-style addressing: the bucket is in the path, not in the host name.
    assert seen[0]["host"].startswith("127.0.0.1:")
    assert seen[0][":path"] == "/bkt/run/arr/zarr.json"


def test_ts_context_is_shared_and_configured() -> None:
    a = S3Storage("b", endpoint_url="http://127.0.0.1:1", anon=True)
    b = S3Storage("c", endpoint_url="http://127.0.0.1:1", anon=True)
    assert a.ts_context() is b.ts_context()
    spec = a.ts_context().spec.to_json()
    assert spec["s3_request_concurrency"]["limit"] >= 1
    assert spec["s3_request_retries"]["max_retries"] >= 1


# -- secrets ------------------------------------------------------------------------------
def test_secrets_never_show(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET + "-env")
    st = S3Storage("no-such-bucket-ckpt", "run", endpoint_url=s3_server.endpoint_url,
                   region=s3_server.region, key=KEY_ID, secret=SECRET, token=TOKEN)
    texts = [repr(st), str(st), st.url, st.describe("x"), json.dumps(st.kvstore_spec("x")),
             repr(vars(st))]
    with pytest.raises(StorageError) as info:
        st.write_bytes("x.bin", b"1")
    texts += [str(info.value), repr(info.value)]
    for secret in (SECRET, TOKEN, KEY_ID):
        for text in texts:
            assert secret not in text
    # A server message that echoes a secret is scrubbed too.
    err = st._error(_client_error("InternalError", f"boom {SECRET} {TOKEN} {SECRET}-env"), "writing", "x")
    assert SECRET not in str(err) and TOKEN not in str(err) and "***" in str(err)


def test_pickled_storage_still_works(s3_url: str, s3_options: dict[str, Any]) -> None:
    st = open_storage(s3_url, **s3_options)
    st.write_bytes("p.bin", b"pickled")
    clone = pickle.loads(pickle.dumps(st))
    assert clone.read_bytes("p.bin") == b"pickled"


def test_bad_credential_arguments() -> None:
    with pytest.raises(ValueError) as info:
        S3Storage("b", key=KEY_ID)
    assert KEY_ID not in str(info.value)
    with pytest.raises(ValueError):
        S3Storage("b", token=TOKEN)
    with pytest.raises(ValueError):
        S3Storage("")


# -- errors -------------------------------------------------------------------------------
def test_missing_bucket_is_a_clear_error(s3_server: S3Server) -> None:
    st = S3Storage("ckpt-no-such-bucket", "run", **s3_server.storage_options())
    for op in (lambda: st.write_bytes("m.json", b"{}"), lambda: st.read_bytes("m.json"),
               lambda: st.size("m.json"), lambda: st.exists("m.json"), st.list_dirs,
               st.list_files, lambda: st.delete_dir("step-1")):
        with pytest.raises(StorageError) as info:
            op()
        assert not isinstance(info.value, FileNotFoundError)  # not "no checkpoint yet"
        assert "ckpt-no-such-bucket" in str(info.value)
        assert "does not exist" in str(info.value)
        assert info.value.hint


def test_missing_object_is_a_plain_file_not_found(s3_url: str, s3_options: dict[str, Any]) -> None:
    st = open_storage(s3_url, **s3_options)
    with pytest.raises(FileNotFoundError) as info:
        st.read_bytes("step-9/manifest.json")
    assert not isinstance(info.value, StorageError)
    assert s3_url + "/step-9/manifest.json" in str(info.value)


def test_permission_errors_are_typed() -> None:
    st = S3Storage("b", "run", endpoint_url="http://127.0.0.1:1", anon=True)
    for code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        err = st._error(_client_error(code, "no"), "reading", "m.json")
        assert isinstance(err, StoragePermissionError) and isinstance(err, PermissionError)
        assert "s3://b/run/m.json" in str(err)
    import botocore.exceptions

    err = st._error(botocore.exceptions.NoCredentialsError(), "writing", "m.json")
    assert isinstance(err, StoragePermissionError)
    other = st._error(_client_error("InternalError", "server fell over"), "writing", "m.json")
    assert type(other) is StorageError and "s3://b/run/m.json" in str(other)


def test_missing_s3fs_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "s3fs", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "s3fs" else object())
    with pytest.raises(MissingDependencyError) as info:
        open_storage("s3://bucket/run")
    assert isinstance(info.value, ImportError) and isinstance(info.value, CheckpointError)
    assert "pip install 'ckpt-torch[s3]'" in str(info.value)


def _client_error(code: str, message: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}}, "PutObject")
