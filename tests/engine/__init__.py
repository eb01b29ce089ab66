"""Tests of the save/load engine: round trips, the async snapshot, direct reads and writes,
the on-disk layout, the save planner, load semantics and interop with other zarr readers."""
