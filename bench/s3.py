"""``python -m bench.s3``: save and load N GiB to local S3 servers on 127.0.0.1 (moto,
in this process, and SeaweedFS, a real object store, in one run): ckpt vs
torch.distributed.checkpoint with its fsspec writer vs a plain parallel s3fs
upload/download of the same bytes.

The plain s3fs variant is the transfer ceiling: the tensors' bytes are prepared before
the clock starts and go up as one object per tensor (``fs.pipe``) and come back whole
(``fs.cat``) on a pool of threads. ckpt and DCP pay for their own serialisation. Every
load is checked bit for bit after its clock stops. moto keeps objects in memory, so the
machine needs a few times N GiB of RAM; SeaweedFS writes them to a temporary directory.
The servers' speed, not a network's, bounds all three.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench._common import Config, Progress, md_table

GIB = 1 << 30
TENSOR_BYTES = 64 << 20  # the state is made of 64 MiB float32 tensors (the last may be smaller)
THREADS = 8
_KEY, _SECRET = "bench-key", "bench-secret"  # the servers' dummy credentials


def _env() -> None:
    """Dummy credentials, no shared config, no proxies: nothing leaves 127.0.0.1."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        os.environ.pop(var, None)
    os.environ.update(AWS_ACCESS_KEY_ID=_KEY, AWS_SECRET_ACCESS_KEY=_SECRET,
                      AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                      AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                      NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")


def make_state(nbytes: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    left, i = nbytes, 0
    while left > 0:
        n = min(TENSOR_BYTES, left) // 4
        state[f"layer{i:03d}.weight"] = torch.randn(n // 1024, 1024, generator=g) if n >= 1024 else torch.randn(n, generator=g)
        left -= max(4, n * 4)
        i += 1
    return state


def _check(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    for k, w in want.items():
        if not torch.equal(got[k].view(torch.uint8), w.view(torch.uint8)):
            raise AssertionError(f"{what}: {k} differs after the round trip")


def _time(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


SERVERS = ("moto", "seaweedfs")
_SERVER_NAMES = {"moto": "moto ThreadedMotoServer (in process, objects in memory)",
                 "seaweedfs": "SeaweedFS `weed server` (separate process, objects on local disk)"}


@contextlib.contextmanager
def _server(kind: str) -> Iterator[str]:
    """A local S3 server of ``kind`` on 127.0.0.1; yields its endpoint."""
    if kind == "moto":
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        assert host == "127.0.0.1"
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()
    elif kind == "seaweedfs":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests._seaweedfs import SeaweedFS  # the launcher the test suite uses

        with tempfile.TemporaryDirectory(prefix="bench-seaweedfs-") as root:
            weed = SeaweedFS(root, _KEY, _SECRET).start()
            try:
                yield weed.endpoint_url
            finally:
                weed.stop()
    else:
        raise ValueError(f"unknown S3 server {kind!r}; choose from {', '.join(SERVERS)}")


def _bench_on(endpoint: str, state: dict[str, torch.Tensor], repeats: int, quiet: bool) -> dict[str, dict[str, float]]:
    """ckpt, DCP's fsspec writer and plain s3fs on one server: {variant: {op_s: seconds}}."""
    import boto3
    import s3fs

    import ckpt

    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    s3_opts = {"endpoint_url": endpoint, "region": "us-east-1"}
    fs_opts = {"endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"},
               "config_kwargs": {"s3": {"addressing_style": "path"}, "max_pool_connections": 32},
               "skip_instance_cache": True, "use_listings_cache": False}
    fs = s3fs.S3FileSystem(**fs_opts)
    results: dict[str, dict[str, float]] = {}

    def clear(prefix: str) -> None:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})

    def best(name: str, op: str, fn: Any, before: Any = None) -> None:
        times = []
        for _ in range(repeats):
            if before is not None:
                before()
            times.append(_time(fn))
        results.setdefault(name, {})[f"{op}_s"] = min(times)
        if not quiet:
            print(f"  {name:<10} {op:<5} {min(times):8.2f} s", flush=True)

    # -- plain s3fs: the bytes, prepared beforehand, one object per tensor ------------
    payload = {k: t.numpy().tobytes() for k, t in state.items()}
    pool = concurrent.futures.ThreadPoolExecutor(THREADS)

    def plain_save() -> None:
        list(pool.map(lambda kv: fs.pipe(f"{bucket}/plain/{kv[0]}", kv[1]), payload.items()))

    def plain_load() -> None:
        got = dict(zip(payload, pool.map(lambda k: fs.cat(f"{bucket}/plain/{k}"), payload)))
        assert all(len(got[k]) == len(v) for k, v in payload.items())

    best("s3fs", "save", plain_save, before=lambda: clear("plain/"))
    best("s3fs", "load", plain_load)
    payload.clear()
    clear("plain/")

    # -- ckpt -------------------------------------------------------------------------
    url = f"s3://{bucket}/ckpt/step-000000001"
    snap = ckpt.Snapshotter()
    target = {k: torch.empty_like(t) for k, t in state.items()}
    best("ckpt", "save", lambda: snap.save_async(state, url, storage_options=s3_opts, overwrite=True).result(),
         before=lambda: clear("ckpt/"))
    best("ckpt", "load", lambda: ckpt.load(target, url, storage_options=s3_opts))
    _check(target, state, "ckpt")
    snap.close()
    clear("ckpt/")

    # -- DCP with its fsspec writer -----------------------------------------------------
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    dcp_url = f"s3://{bucket}/dcp"
    target = {k: torch.empty_like(t) for k, t in state.items()}
    best("dcp", "save", lambda: dcp.save(state, storage_writer=FsspecWriter(dcp_url, thread_count=THREADS, **fs_opts),
                                         no_dist=True), before=lambda: clear("dcp/"))
    best("dcp", "load", lambda: dcp.load(target, storage_reader=FsspecReader(dcp_url, **fs_opts), no_dist=True))
    _check(target, state, "dcp")
    clear("dcp/")
    pool.shutdown()
    client.delete_bucket(Bucket=bucket)
    return results


def run_s3(gib: float, out: str | None, repeats: int = 1, quiet: bool = False,
           servers: tuple[str, ...] = SERVERS) -> dict[str, Any]:
    _env()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    state = make_state(int(gib * GIB))
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    by_server: dict[str, dict[str, dict[str, float]]] = {}
    for kind in servers:
        with _server(kind) as endpoint:
            if not quiet:
                print(f"S3 benchmark: {nbytes / GIB:.2f} GiB in {len(state)} tensors, {kind} on {endpoint}", flush=True)
            by_server[kind] = _bench_on(endpoint, state, repeats, quiet)

    rows = []
    for kind, results in by_server.items():
        for name in ("ckpt", "dcp", "s3fs"):
            for op in ("save", "load"):
                sec = results[name][f"{op}_s"]
                base = results["s3fs"][f"{op}_s"]
                rows.append({"server": kind, "variant": name, "op": op, "seconds": sec, "gbps": nbytes / sec / 1e9,
                             "ratio_to_s3fs": sec / base})
    table = md_table(["server", "variant", "op", "seconds", "GB/s", "time / plain s3fs"],
                     [[r["server"], r["variant"], r["op"], f"{r['seconds']:.2f}", f"{r['gbps']:.3f}",
                       f"{r['ratio_to_s3fs']:.2f}x"] for r in rows], "lllrrr")
    if not quiet:
        print()
        print(table)
    report = {
        "benchmark": "s3", "bytes": nbytes, "tensors": len(state), "threads": THREADS, "repeats": repeats,
        "servers": {k: _SERVER_NAMES[k] for k in by_server},
        "host": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                 "platform": platform.platform()},
        "rows": rows,
        "ratios": {kind: {"ckpt_save_speedup_over_dcp": r["dcp"]["save_s"] / r["ckpt"]["save_s"],
                          "ckpt_load_speedup_over_dcp": r["dcp"]["load_s"] / r["ckpt"]["load_s"],
                          "ckpt_save_time_over_s3fs": r["ckpt"]["save_s"] / r["s3fs"]["save_s"],
                          "ckpt_load_time_over_s3fs": r["ckpt"]["load_s"] / r["s3fs"]["load_s"]}
                   for kind, r in by_server.items()},
        "markdown": (f"### S3 (local servers on 127.0.0.1: {', '.join(by_server)})\n\nSave and load of "
                     f"{nbytes / GIB:.2f} GiB ({len(state)} float32 tensors): ckpt vs DCP's fsspec writer/reader "
                     f"vs a plain parallel s3fs upload/download of the same bytes ({THREADS} threads), bit-exact "
                     "checked after each load. "
                     + " ".join(f"{k}: {_SERVER_NAMES[k]}." for k in by_server) + "\n\n" + table),
    }
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {out}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.s3", description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=None, help="GiB to save and load (default 1.0; --quick: 0.05)")
    p.add_argument("--quick", action="store_true", help="a small, fast run (smoke test)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each operation; the minimum is kept")
    p.add_argument("--out", default="bench/results/s3.json", help="where the JSON report goes")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help=f"comma-separated S3 servers to run on (default: {','.join(SERVERS)})")
    a = p.parse_args(argv)
    servers = tuple(k.strip() for k in a.servers.split(",") if k.strip())
    if not servers or set(servers) - set(SERVERS):
        p.error(f"--servers: choose from {', '.join(SERVERS)}")
    gib = a.gib if a.gib is not None else (0.05 if a.quick else 1.0)
    if gib <= 0:
        p.error("--gib must be positive")
    run_s3(gib, a.out, repeats=max(1, a.repeats), servers=servers)
    return 0


def steps(cfg: Config) -> int:
    return 1


def run(cfg: Config, tmp: Path, progress: Progress) -> dict[str, Any]:
    """The harness's scenario: ``cfg.state_gib`` GiB (quick: 0.05) saved and loaded on S3."""
    progress.step("s3: save and load on a local S3 server")
    r = run_s3(0.05 if cfg.quick else cfg.state_gib, None, repeats=cfg.repeats, quiet=True)
    r["scenario"] = "s3"
    return r


if __name__ == "__main__":
    sys.exit(main())
