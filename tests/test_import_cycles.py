"""No import cycles between ckpt's modules (``make lint`` runs this file too).

Every ``import`` / ``from ... import`` of a ``ckpt`` module counts, at module level or
inside a function (a lazy import is still a cycle, only a hidden one), and so do imports
under ``if TYPE_CHECKING:``: they never run, but two modules that name each other's types
are one module split in two, and the split is the seam to fix. ``from ckpt import errors``
depends on ``ckpt.errors``; ``from ckpt import save`` depends on the package ``ckpt`` itself.
Run as a script it prints every cycle: ``python tests/test_import_cycles.py``.

Outside ``ckpt._tools`` (the command line's library) and ``ckpt._cli``, only the public
``ckpt.tools`` imports it: the library never depends on its CLI's. The integrations
(``ckpt.integrations``) use the engine's public entry points, never ``ckpt._engine``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ckpt"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports_of(source: str, name: str, is_package: bool, mods: set[str]) -> set[str]:
    """The ckpt modules that the module ``name`` (of ``source``) imports, anywhere in it."""
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        else:
            continue
        out.update(t for t in targets if t in mods and t != name)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the ckpt modules it imports (type-only imports included)."""
    mods = _modules()
    return {name: imports_of(path.read_text(), name, path.name == "__init__.py", set(mods))
            for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(graph: dict[str, set[str]], comp: list[str]) -> str:
    return "\n".join(f"  {m} -> {', '.join(sorted(graph[m] & set(comp)))}" for m in comp)


def test_no_import_cycles_between_ckpt_modules() -> None:
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n\n".join(_describe(graph, c) for c in found)


def test_type_only_and_lazy_imports_count() -> None:
    mods = {"ckpt", "ckpt.a", "ckpt.b", "ckpt.c", "ckpt.d"}
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from ckpt.b import B\n"
        "    from . import c\n"
        "def f():\n"
        "    import ckpt.d\n"
    )
    assert imports_of(source, "ckpt.a", False, mods) == {"ckpt.b", "ckpt.c", "ckpt.d"}
    assert imports_of("from ckpt import a\n", "ckpt.b", False, mods) == {"ckpt.a"}
    assert imports_of("from ckpt import save\n", "ckpt.b", False, mods) == {"ckpt"}


def _cli_library(m: str) -> bool:
    return m.split(".")[:2] in (["ckpt", "_tools"], ["ckpt", "_cli"])


def test_only_ckpt_tools_imports_the_cli_library() -> None:
    graph = import_graph()
    outside = {m: sorted(t for t in deps if t.split(".")[:2] == ["ckpt", "_tools"])
               for m, deps in graph.items() if m != "ckpt.tools" and not _cli_library(m)}
    assert not {m: t for m, t in outside.items() if t}


def test_integrations_use_public_entry_points() -> None:
    graph = import_graph()
    reach = {m: sorted(t for t in deps if t.split(".")[:2] in (["ckpt", "_engine"], ["ckpt", "_tools"]))
             for m, deps in graph.items() if m.startswith("ckpt.integrations")}
    assert not {m: t for m, t in reach.items() if t}


def test_the_check_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


if __name__ == "__main__":
    g = import_graph()
    cs = cycles(g)
    for c in cs:
        print(_describe(g, c), end="\n\n")
    sys.exit(1 if cs else 0)
