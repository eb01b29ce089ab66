"""The manifest fuzz of ``test_manifest_fuzz.py``, run in a child process whose address
space is limited (``RLIMIT_AS``): Hypothesis mutates the sizes, offsets, shapes, dtypes,
paths and chunk grids of a real checkpoint's manifest (checksum recomputed, so the
mutation reaches the readers), and every reader (load, verify, info, export, reshard, cp)
must give a typed ckpt error or succeed — a load that succeeds bit for bit on every entry
the mutation left alone. An absurd allocation aborts the child (tensorstore's
``std::bad_alloc``), which the parent sees as a dead process.

``python -m tests.reliability._fuzz_manifests LIMIT_BYTES EXAMPLES WORKDIR``
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from typing import Any

FIELDS = ("shape", "dtype", "offset", "nbytes", "shard_shape", "chunk_shape", "path", "layout")
_INTS = [0, 1, 2, 3, 7, 63, 64, 255, 256, 1023, 1024, 4096, 65536, 2**20, 2**24, 2**28, 2**31, 2**32, 2**36,
         2**40, 2**50, 2**62, 2**63 - 1, -1]
_PATHS = ["arrays/w.zarr", "packs/u00000-0000", "arrays/b.zarr", "arrays/w.zarr/c.0.0", "packs",
          "arrays", "arrays/nothere.zarr", "objects/x.pkl", "manifest.json"]
_DTYPES = ["float32", "float16", "bfloat16", "int64", "int8", "uint8", "bool", "complex128", "float64",
           "float8_e4m3fn", "nope", ""]


def main(argv: list[str]) -> None:
    from tests.reliability import sign_manifest
    from tests.reliability._readers import limit_memory

    limit_memory(int(argv[0]))
    examples, work = int(argv[1]), argv[2]

    import torch
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import ckpt
    from tests.reliability._readers import run_all

    def state(seed: int = 1) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        return {"w": torch.randn(1024, 256, generator=g),  # 1 MiB: 2 shards of 32 chunks
                "v": torch.randn(3, 5, 7, generator=g).double(),  # packed
                "b": torch.randn(64, generator=g).to(torch.bfloat16),  # packed
                "i": torch.randint(-(2**40), 2**40, (16,), generator=g), "step": 1}

    def blank() -> dict[str, Any]:
        return {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else -1) for k, v in state().items()}

    template = os.path.join(work, "template")
    ckpt.Snapshotter(ckpt.SaveOptions(pool_bytes=1 << 20, chunk_bytes=16 << 10)).save(state(), template, step=1)
    body0 = json.loads(open(os.path.join(template, "manifest.json")).read())
    want = state()
    ints = st.one_of(st.sampled_from(_INTS), st.integers(-2, 2**64))
    int_lists = st.lists(ints, min_size=0, max_size=4)
    value = {"shape": int_lists, "shard_shape": int_lists, "chunk_shape": int_lists,
             "offset": ints, "nbytes": ints, "dtype": st.sampled_from(_DTYPES),
             "path": st.sampled_from(_PATHS), "layout": st.sampled_from(["array", "packed", "pieces", "x"])}
    mutation = st.tuples(st.sampled_from(["w", "v", "b", "i"]), st.sampled_from(FIELDS), st.data())
    seen = {"n": 0}

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(mutation, min_size=1, max_size=3))
    def check(mutations: list[Any]) -> None:
        body = copy.deepcopy(body0)
        touched = set()
        for key, fld, data in mutations:
            e = body["entries"][key]
            holder = e if fld in ("shape", "dtype") else e["storage"]
            holder[fld] = data.draw(value[fld], label=f"{key}.{fld}")
            touched.add(key)
        seen["n"] += 1
        url = os.path.join(work, f"ex{seen['n']}")
        shutil.copytree(template, url)
        with open(os.path.join(url, "manifest.json"), "wb") as f:
            f.write(sign_manifest(body))
        print(f"example {seen['n']}: {[(k, f) for k, f, _ in mutations]}", flush=True)
        try:
            res = run_all(url, blank)
            bad = {r: w for r, w in res.items() if w.startswith("untyped")}
            assert not bad, (mutations, bad)
            if res["load"] == "ok":  # bit-exact where the mutation did not reach
                got = blank()
                ckpt.load(got, url)
                for k in ("w", "v", "b", "i"):
                    if k not in touched:
                        assert torch.equal(got[k], want[k]), (k, mutations)
        finally:
            shutil.rmtree(url, ignore_errors=True)

    check()
    print(f"fuzz: {seen['n']} manifests, every reader typed or exact", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
