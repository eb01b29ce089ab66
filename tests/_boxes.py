"""The distinct boxes a checkpoint entry was written as: listed (explicit pieces), or
derived from its sharding rule (format 3: DTensor placements, no per-box list)."""

from __future__ import annotations

from typing import Any

from ckpt._sharding import Sharding


def entry_boxes(e: dict[str, Any]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    if "boxes" in e:
        return [(tuple(b["offsets"]), tuple(b["sizes"])) for b in e["boxes"]]
    shape = tuple(e["shape"])
    sh = e.get("sharding")
    if sh is None:  # a plain tensor held whole by every rank, written once
        return [((0,) * len(shape), shape)]
    rule = Sharding(tuple(sh["mesh"]), tuple(tuple(d) for d in sh["dims"]), (0,) * len(sh["mesh"]))
    return [b for _g, b in rule.boxes(shape)]
