"""Property: whatever state goes in comes back out, bit for bit, on every backend.

Random nested states — tensors of every supported dtype (ranks 0-4, empty dims,
non-contiguous views, some big enough for the array layout), plain values (ints, floats
with inf/nan, strings, None, bytes, tuples, sets, dicts with int keys, nested lists and
dicts) and, optionally, values that need pickle — are saved and loaded, and compared
with tensors' raw bits so NaN payloads and -0.0 count.

Backends are the parametrized ``url_factory`` fixture (fresh checkpoint URLs plus the
``storage_options`` that reach them); add a backend by adding a case to ``_BACKENDS``.
The S3 cases (``s3-moto``, ``s3-seaweedfs``) run on the servers tests/_s3server.py starts,
marked ``s3``.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import fractions
import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt
from ckpt._format import supported_dtypes
from ckpt.errors import PickleNotAllowedError
from ckpt.storage._memory import drop
from tests._helpers import assert_same, mlp
from tests._s3server import fresh_place, server, server_params

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")

DTYPES = [getattr(torch, n) for n in supported_dtypes()]
OPTIONS = ckpt.SaveOptions(pool_bytes=16 << 20, chunk_bytes=64 << 10)  # several inner chunks per shard
ARRAY_BYTES = 300 << 10  # above the 256 KiB pack threshold: the array layout


@dataclass
class UrlFactory:
    """Fresh checkpoint URLs under ``base`` on one backend; ``storage_options`` reach it."""

    base: str
    storage_options: dict[str, Any] | None = None

    def __call__(self) -> str:
        return f"{self.base}/run-{uuid.uuid4().hex[:8]}/step-000000001"

    def save(self, snap: ckpt.Snapshotter, state: dict[str, Any], url: str, **kwargs: Any) -> None:
        snap.save_async(state, url, storage_options=self.storage_options, **kwargs).result()

    def load(self, state: dict[str, Any], url: str, **kwargs: Any) -> None:
        ckpt.load(state, url, storage_options=self.storage_options, **kwargs)

    def entries(self, url: str) -> dict[str, dict[str, Any]]:
        return ckpt.read_manifest(url, storage_options=self.storage_options).entries


# ---------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------
def _file_backend(request: pytest.FixtureRequest) -> Iterator[UrlFactory]:
    yield UrlFactory(str(request.getfixturevalue("tmp_path")))


def _memory_backend(request: pytest.FixtureRequest) -> Iterator[UrlFactory]:
    name = f"roundtrip-{uuid.uuid4().hex[:8]}"
    yield UrlFactory(f"memory://{name}")
    drop(name)


def _s3_backend(kind: str) -> Callable[[pytest.FixtureRequest], Iterator[UrlFactory]]:
    """A local S3 server of ``kind`` (moto, SeaweedFS; or CKPT_TEST_S3_ENDPOINT), real S3
    protocol over HTTP."""
    def backend(request: pytest.FixtureRequest) -> Iterator[UrlFactory]:
        srv = server(kind, request.getfixturevalue("tmp_path_factory"))
        with fresh_place(srv) as url:
            yield UrlFactory(url, srv.storage_options())
    return backend


_BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Iterator[UrlFactory]]] = {
    "file": _file_backend,
    "memory": _memory_backend,
    **{f"s3-{k}": _s3_backend(k) for k in server_params()},
}


@pytest.fixture(params=[pytest.param(b, marks=pytest.mark.s3) if b.startswith("s3") else b for b in _BACKENDS])
def url_factory(request: pytest.FixtureRequest) -> Iterator[UrlFactory]:
    """Fresh checkpoint URLs on one backend (one call per checkpoint: Hypothesis reuses
    the fixture across examples)."""
    yield from _BACKENDS[request.param](request)


@pytest.fixture(scope="module")
def snapshotter() -> Iterator[ckpt.Snapshotter]:
    snap = ckpt.Snapshotter(OPTIONS)
    yield snap
    snap.close()


# ---------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random raw bits (every NaN payload, denormal, -0.0...); bools are 0/1."""
    n = math.prod(shape)
    rng = np.random.default_rng(seed)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    if dtype == torch.bool:
        return torch.from_numpy(rng.integers(0, 2, n, dtype=np.uint8)).view(torch.bool).reshape(shape)
    raw = torch.from_numpy(rng.integers(0, 256, n * _itemsize(dtype), dtype=np.uint8))
    return raw.view(dtype).reshape(shape)


@st.composite
def tensors(draw: st.DrawFn, *, big: bool = False) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    if big:
        cols = draw(st.sampled_from([256, 384, 1000]))
        rows = -(-ARRAY_BYTES // (cols * _itemsize(dtype)))
        shape: tuple[int, ...] = (rows, cols)
    else:
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=4)))
    seed = draw(st.integers(0, 2**32 - 1))
    view = draw(st.sampled_from(["contiguous", "transposed", "strided", "offset"]))
    if view == "transposed" and len(shape) >= 2:
        base = _random_tensor(dtype, shape[::-1], seed)
        return base.permute(*reversed(range(len(shape))))
    if view == "strided" and len(shape) >= 1:
        base = _random_tensor(dtype, (shape[0] * 2, *shape[1:]), seed)
        return base[::2]
    if view == "offset" and len(shape) >= 1:
        base = _random_tensor(dtype, (shape[0] + 1, *shape[1:]), seed)
        return base[1:]
    return _random_tensor(dtype, shape, seed)


_TRICKY_KEYS = ["~", ".", "..", "", "__ckpt__", "%", "%2F", "a/b", "x" * 130, "ü", "c", "zarr.json"]
str_keys = st.one_of(st.sampled_from(_TRICKY_KEYS), st.text(max_size=6))

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.binary(max_size=8),
    st.sampled_from(DTYPES),
    st.sets(st.integers(-5, 5), max_size=3),
    st.frozensets(st.text(max_size=3), max_size=3),
)
pickle_leaves = st.one_of(
    st.fractions(max_denominator=100),
    st.builds(complex, st.floats(-10, 10), st.floats(-10, 10)),
    st.decimals(allow_nan=False, places=3, min_value=-100, max_value=100),
    st.datetimes(),
)


def values(leaves: st.SearchStrategy[Any], *, with_tensors: bool = True) -> st.SearchStrategy[Any]:
    base = st.one_of(leaves, tensors()) if with_tensors else leaves

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.lists(children, max_size=3),
            st.lists(children, max_size=3).map(tuple),
            st.dictionaries(str_keys, children, max_size=3),
            st.dictionaries(st.integers(-3, 1000), children, max_size=3),
        )

    return st.recursive(base, extend, max_leaves=8)


@st.composite
def states(draw: st.DrawFn) -> tuple[dict[str, Any], bool]:
    use_pickle = draw(st.booleans())
    leaves = st.one_of(json_leaves, pickle_leaves) if use_pickle else json_leaves
    top_keys = st.one_of(st.sampled_from([k for k in _TRICKY_KEYS if k]), st.text(min_size=1, max_size=6))
    state: dict[str, Any] = draw(st.dictionaries(
        top_keys, st.one_of(tensors(), values(leaves)), min_size=1, max_size=5))
    if draw(st.booleans()):  # a tensor for the array layout, top level or nested
        t = draw(tensors(big=True))
        if draw(st.booleans()):
            state["big"] = t
        else:
            state["nested"] = {"layer": [t, {"w": draw(tensors(big=True))}], 3: "x"}
    return state, use_pickle


# ---------------------------------------------------------------------------
# load targets
# ---------------------------------------------------------------------------
def _garbage_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype)
    out.reshape(-1).view(torch.uint8).fill_(0xA5 if t.dtype != torch.bool else 0)
    return out


def _live_copy(obj: Any) -> Any:
    """The same structure with tensors replaced by garbage: loaded in place."""
    if isinstance(obj, torch.Tensor):
        return _garbage_like(obj)
    if type(obj) is dict:
        return {k: _live_copy(v) for k, v in obj.items()}
    if type(obj) is list:
        return [_live_copy(v) for v in obj]
    if type(obj) is tuple:
        return tuple(_live_copy(v) for v in obj)
    return obj


def _target(state: dict[str, Any], in_place: bool) -> dict[str, Any]:
    """Top-level tensors always load in place (into a transposed view half the time);
    structures load into a live copy or into None (new tensors)."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            if in_place and v.dim() >= 2:
                out[k] = _garbage_like(v.mT).mT  # a non-contiguous destination
            else:
                out[k] = _garbage_like(v)
        else:
            out[k] = _live_copy(v) if in_place else None
    return out


def _roundtrip(snap: ckpt.Snapshotter, urls: UrlFactory, state: dict[str, Any], *, allow_pickle: bool = False,
               in_place: bool = True, url: str | None = None) -> str:
    url = url or urls()
    urls.save(snap, state, url, allow_pickle=allow_pickle)
    target = _target(state, in_place)
    dests = {k: v for k, v in target.items() if isinstance(v, torch.Tensor)}
    urls.load(target, url, allow_pickle=allow_pickle)
    assert list(target) == list(state)
    for k, v in dests.items():
        assert target[k] is v, f"{k}: a top-level tensor was not loaded in place"
    assert_same(target, state)
    return url


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(drawn=states(), in_place=st.booleans())
def test_roundtrip_is_bit_exact(url_factory: UrlFactory, snapshotter: ckpt.Snapshotter,
                                drawn: tuple[dict[str, Any], bool], in_place: bool) -> None:
    state, use_pickle = drawn
    _roundtrip(snapshotter, url_factory, state, allow_pickle=use_pickle, in_place=in_place)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_in_both_layouts(url_factory: UrlFactory, snapshotter: ckpt.Snapshotter,
                                     dtype: torch.dtype) -> None:
    """Deterministic coverage: each dtype packed, as an array, and as a strided array."""
    rows = -(-ARRAY_BYTES // (512 * _itemsize(dtype)))
    state = {
        "small": _random_tensor(dtype, (3, 5), 1),
        "scalar": _random_tensor(dtype, (), 2),
        "empty": _random_tensor(dtype, (4, 0, 2), 3),
        "big": _random_tensor(dtype, (rows, 512), 4),
        "big_t": _random_tensor(dtype, (512, rows), 5).t(),
    }
    url = _roundtrip(snapshotter, url_factory, state)
    entries = url_factory.entries(url)
    assert entries["small"]["storage"]["layout"] == "packed"
    assert entries["big"]["storage"]["layout"] == "array"
    assert entries["big_t"]["storage"]["layout"] == "array"


Point = collections.namedtuple("Point", "x y")


class Custom:
    def __init__(self, a: Any) -> None:
        self.a = a

    def __eq__(self, other: object) -> bool:
        return type(other) is Custom and other.a == self.a


def test_values_that_need_pickle(url_factory: UrlFactory, snapshotter: ckpt.Snapshotter) -> None:
    state = {
        "cfg": {
            "frac": fractions.Fraction(1, 3),
            "point": Point(1, 2.5),
            "when": datetime.datetime(2024, 5, 1, 12, 30),
            "dec": decimal.Decimal("1.25"),
            "obj": Custom([1, (2, 3)]),
            "tensor": _random_tensor(torch.float32, (4, 4), 9),
            "list": [complex(1, -2), "plain", {5: Custom("x")}],
        },
        "top": Custom({"k": 1}),
    }
    url = url_factory()
    with pytest.raises(PickleNotAllowedError):
        url_factory.save(snapshotter, state, url)
    _roundtrip(snapshotter, url_factory, state, allow_pickle=True, in_place=False, url=url)
    assert {e["kind"] for e in url_factory.entries(url).values()} == {"tensor", "json", "pickle"}
    with pytest.raises(PickleNotAllowedError):
        url_factory.load({"cfg": None, "top": None}, url)


def test_tricky_keys_and_order(url_factory: UrlFactory, snapshotter: ckpt.Snapshotter) -> None:
    """Keys that need encoding, on array-layout tensors too (their names become paths);
    dict values keep their key order."""
    big = _random_tensor(torch.float32, (300, 256), 7)
    state = {
        "~": {"~~": big, ".": big.clone(), "..": [big.clone()], "": 1},
        "a/b": {"%2F": big.clone(), "x" * 130: big.clone(), "zarr.json": big.clone()},
        "cfg": {"b": 1, "a": {"z": 2, "y": 3}, 10: "int key", 2: float("-inf")},
    }
    url = _roundtrip(snapshotter, url_factory, state, in_place=False)
    layouts = {k: e["storage"]["layout"] for k, e in url_factory.entries(url).items() if e["kind"] == "tensor"}
    assert set(layouts.values()) == {"array"}, layouts


def test_odd_strides(url_factory: UrlFactory, snapshotter: ckpt.Snapshotter) -> None:
    """Contiguous by torch's rules but with arbitrary strides on size-1 dims."""
    base = _random_tensor(torch.bfloat16, (4, 6), 11)
    state = {
        "one": base.reshape(-1)[::2][:1],  # shape (1,), stride (2,)
        "col": base[:, :1].t(),  # shape (1, 4), stride (1, 6)
        "row": base[1:2, ::3],  # shape (1, 2), stride (6, 3)
        "big": _random_tensor(torch.float32, (1, 200_000), 12).expand(1, 200_000)[:, ::2],
    }
    _roundtrip(snapshotter, url_factory, state)


def test_earlier_checkpoint_survives_later_saves(url_factory: UrlFactory, snapshotter: ckpt.Snapshotter) -> None:
    """Staging memory is reused by the next snapshot: a stored checkpoint must not
    reference it (the memory kvstore keeps what it is given)."""
    first = {"w": _random_tensor(torch.float32, (300, 400), 1), "b": _random_tensor(torch.float32, (8,), 2)}
    url = url_factory()
    url_factory.save(snapshotter, first, url)
    for seed in range(3):
        later = {"w": _random_tensor(torch.float32, (300, 400), 10 + seed),
                 "b": _random_tensor(torch.float32, (8,), 20 + seed)}
        url_factory.save(snapshotter, later, url_factory())
    target = {"w": torch.empty(300, 400), "b": torch.empty(8)}
    url_factory.load(target, url)
    assert_same(target, first)


def test_module_and_optimizer(url_factory: UrlFactory, snapshotter: ckpt.Snapshotter) -> None:
    model = mlp(0, 64, 1200, 3, norm=True)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=3)
    for _ in range(2):
        model(torch.randn(8, 64)).sum().backward()
        optim.step()
        sched.step()
    url = url_factory()
    url_factory.save(snapshotter, {"model": model, "optim": optim, "sched": sched}, url)
    want_model = {k: v.clone() for k, v in model.state_dict().items()}
    want_optim = optim.state_dict()
    want_sched = sched.state_dict()

    model2 = mlp(1, 64, 1200, 3, norm=True)
    optim2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    sched2 = torch.optim.lr_scheduler.StepLR(optim2, step_size=7)
    url_factory.load({"model": model2, "optim": optim2, "sched": sched2}, url)
    assert_same(dict(model2.state_dict()), want_model)
    got = optim2.state_dict()
    assert got["param_groups"] == want_optim["param_groups"]
    assert_same(got["state"], want_optim["state"])
    assert sched2.state_dict() == want_sched


def test_optimizer_over_modules_with_equal_names_is_refused(url_factory: UrlFactory,
                                                            snapshotter: ckpt.Snapshotter) -> None:
    """Optimizer state is keyed by parameter name; two modules' names must not collide
    (they did silently: half of the state was lost)."""
    enc, dec = torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.Sequential(torch.nn.Linear(2, 2))
    optim = torch.optim.Adam([*enc.parameters(), *dec.parameters()])
    for m in (enc, dec):
        m(torch.randn(3, 2)).sum().backward()
    optim.step()
    with pytest.raises(ckpt.errors.UnsupportedStateError, match="0.weight"):
        url_factory.save(snapshotter, {"enc": enc, "dec": dec, "optim": optim}, url_factory())
