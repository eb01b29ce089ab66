"""No ckpt module touches another module's private fields (``make lint`` runs this file).

An attribute ``obj._name`` read or written through anything but ``self``, ``cls`` or
``super()`` must be a name the same module defines (a private field of its own classes,
e.g. through a weak reference to itself); a private field of another module's object
needs a public entry point instead. Torch's tensor version counter (``_version``) is the
one foreign private name ckpt relies on. Run as a script it prints every such access.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ckpt"
# torch.Tensor._version: the in-place change counter; threading._register_atexit: the exit
# hook concurrent.futures itself uses (a save in flight at exit must run before it);
# torch.distributed's _get_process_group_store (_get_default_store on an older torch): a
# side group's c10d store (torch has no public accessor), for the memory tier's exchanges
# by key
FOREIGN_OK = {"_version", "_register_atexit", "_get_process_group_store", "_get_default_store"}


def _defined(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, self/cls attributes, fields."""
    out: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(n.name)
        elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
            out.add(n.attr)
        elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
            out.add(n.target.id)
    return out


def foreign_private_accesses() -> list[str]:
    found = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        own = _defined(tree)
        for n in ast.walk(tree):
            if not (isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")):
                continue
            v = n.value
            if isinstance(v, ast.Name) and v.id in ("self", "cls"):
                continue
            if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super":
                continue
            if isinstance(v, ast.Name) and v.id[:1].islower() and n.attr in own:
                continue  # the module's own field, reached through a local (e.g. a weakref to self)
            if n.attr in FOREIGN_OK:
                continue
            found.append(f"{path.relative_to(PKG.parent)}:{n.lineno}: {ast.unparse(n)}")
    return found


def test_no_module_touches_another_modules_private_fields() -> None:
    assert foreign_private_accesses() == []


if __name__ == "__main__":
    bad = foreign_private_accesses()
    print("\n".join(bad) or "no private access across modules")
    sys.exit(1 if bad else 0)
