"""Helpers that many test modules share: bit-exact comparisons (of tensors, nested states,
state dicts, modules and optimizers), small seeded factories, and the tally of cases a
reliability module prints at its end (tests/reliability/conftest.py).

Bit-exact means by the bytes: equal dtype and shape, and the same bytes once viewed as
uint8, so -0.0 differs from 0.0 and a NaN equals only the NaN of the same payload."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch


# ---------------------------------------------------------------------------
# bit-exact comparisons
# ---------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes in C order, as a flat uint8 tensor."""
    # clone, not contiguous(): stride 1 even on size-1 dims, which view(uint8) needs
    return t.detach().clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` have the same dtype, shape and bytes."""
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    return torch.equal(tensor_bytes(a), tensor_bytes(b))


def assert_same(got: Any, want: Any, where: str = "state") -> None:
    """``got`` is ``want`` as a round trip gives it back: the same types, dict keys in the
    same order, tensors bit-exact, floats with their sign (NaN as any NaN: JSON keeps NaN,
    not its payload, docs/format.md)."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, f"{where}: {got.dtype}{list(got.shape)}"
        assert torch.equal(tensor_bytes(got), tensor_bytes(want)), f"{where}: tensor bits differ"
    elif isinstance(want, float):
        if math.isnan(want):
            assert math.isnan(got), where
        else:
            assert got == want and math.copysign(1, got) == math.copysign(1, want), f"{where}: {got} != {want}"
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def assert_same_state_dict(got: Mapping[Any, Any], want: Mapping[Any, Any], where: str = "state_dict") -> None:
    """``got`` holds ``want``'s values as a ``state_dict()`` does: mappings with the same
    keys (in any order, any mapping type), lists and tuples of the same kind and length,
    tensors bit-exact, everything else ``==``."""
    assert isinstance(got, Mapping), f"{where}: {type(got).__name__} is not a mapping"
    assert got.keys() == want.keys(), f"{where}: keys {sorted(map(str, got))} != {sorted(map(str, want))}"
    for k, w in want.items():
        _assert_same_value(got[k], w, f"{where}[{k!r}]")


def _assert_same_value(got: Any, want: Any, where: str) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got).__name__} is not a tensor"
        assert same_bits(got, want), f"{where}: {got.dtype}{list(got.shape)} differs from {want.dtype}{list(want.shape)}"
    elif isinstance(want, Mapping):
        assert_same_state_dict(got, want, where)
    elif isinstance(want, list | tuple):
        assert type(got) is type(want) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same_value(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def assert_same_module(got: torch.nn.Module, want: torch.nn.Module) -> None:
    """Every parameter and buffer of ``got`` is bit-exact ``want``'s, under the same names."""
    assert_same_state_dict(got.state_dict(), want.state_dict(), "module")


def assert_same_optimizer(got: torch.optim.Optimizer, want: torch.optim.Optimizer) -> None:
    """``got``'s state (every tensor bit-exact) and param_groups are ``want``'s."""
    assert_same_state_dict(got.state_dict(), want.state_dict(), "optimizer")


# ---------------------------------------------------------------------------
# small seeded factories
# ---------------------------------------------------------------------------
def mlp(seed: int, *widths: int, norm: bool = False) -> torch.nn.Sequential:
    """Linear layers of the given widths, seeded with ``torch.manual_seed(seed)``; a ReLU
    between them, or a BatchNorm1d (running stats: buffers) where ``norm``."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (w_in, w_out) in enumerate(zip(widths, widths[1:])):
        if i:
            layers.append(torch.nn.BatchNorm1d(w_in) if norm else torch.nn.ReLU())
        layers.append(torch.nn.Linear(w_in, w_out))
    return torch.nn.Sequential(*layers)


def randn_state(seed: int, **shapes: tuple[int, ...] | int) -> dict[str, torch.Tensor]:
    """Float32 tensors of the given shapes, drawn in keyword order from one generator
    seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


# ---------------------------------------------------------------------------
# the report of a reliability module
# ---------------------------------------------------------------------------
class Tally:
    """Cases tried and passed by family, and other counts, of one test module. A module
    that names one ``TALLY`` gets its lines printed after its last test (run with -s)."""

    def __init__(self, name: str, *families: str) -> None:
        self.name = name
        self.cases: dict[str, list[int]] = {f: [0, 0] for f in families}  # family -> [tried, passed]
        self.notes: dict[str, Any] = {}

    def tried(self, family: str = "") -> None:
        self.cases.setdefault(family, [0, 0])[0] += 1

    def passed(self, family: str = "") -> None:
        self.cases.setdefault(family, [0, 0])[1] += 1

    def count(self, family: str = "", ok: bool = True) -> None:
        self.tried(family)
        if ok:
            self.passed(family)

    def note(self, what: str, value: Any) -> None:
        self.notes[what] = value

    def add(self, what: str, n: int = 1) -> None:
        self.notes[what] = self.notes.get(what, 0) + n

    def lines(self) -> Iterator[str]:
        for family, (tried, passed) in sorted(self.cases.items()):
            yield f"[reliability] {self.name}{'/' + family if family else ''}: {passed}/{tried} cases passed"
        for what, value in sorted(self.notes.items()):
            yield f"[reliability] {self.name}/{what}: {value}"
