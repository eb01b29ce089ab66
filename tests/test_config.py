"""Configuration has one parser (ckpt/_config.py): every CKPT_* switch is read through
it, a value it cannot use is a ConfigError naming the variable (never silently the
default), a blank one is the default, and an explicit argument beats the environment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ckpt
from ckpt import MemoryTierOptions, _config
from ckpt.errors import ConfigError


@pytest.mark.parametrize("var, read", [
    ("CKPT_DIRECT_READS", _config.direct_reads),
    ("CKPT_DIRECT_WRITES", _config.direct_writes),
    ("CKPT_IO_CONCURRENCY", _config.io_concurrency),
    ("CKPT_RECYCLE", _config.recycle),
    ("CKPT_BACKGROUND_NICE", _config.background_nice),
    ("CKPT_POOL_BYTES", ckpt.SaveOptions.resolve),
    ("CKPT_HUGE_PAGES", ckpt.SaveOptions.resolve),
    ("CKPT_IF_BUSY", ckpt.SaveOptions.resolve),
])
def test_a_value_that_cannot_be_used_is_an_error_naming_the_variable(monkeypatch, var, read):
    monkeypatch.setenv(var, "maybe")
    with pytest.raises(ConfigError) as ei:
        read()
    assert isinstance(ei.value, ValueError) and f"{var}='maybe'" in str(ei.value) and ei.value.hint


def test_switch_values_and_defaults(monkeypatch):
    for var in ("CKPT_DIRECT_READS", "CKPT_DIRECT_WRITES", "CKPT_IO_CONCURRENCY", "CKPT_RECYCLE"):
        monkeypatch.setenv(var, " ")  # blank: the default
    assert _config.direct_reads() and _config.direct_writes() == "direct"
    assert _config.io_concurrency() == 32 and not _config.recycle()
    for raw, mode in (("0", "off"), ("off", "off"), ("1", "direct"), ("Buffered", "buffered")):
        monkeypatch.setenv("CKPT_DIRECT_WRITES", raw)
        assert _config.direct_writes() == mode
    monkeypatch.setenv("CKPT_DIRECT_READS", "no")
    assert not _config.direct_reads()
    monkeypatch.setenv("CKPT_RECYCLE", "yes")
    assert _config.recycle() and not _config.recycle(False)  # explicit beats the environment
    monkeypatch.setenv("CKPT_CHUNK_BYTES", "1MiB")
    assert ckpt.SaveOptions.resolve().chunk_bytes == 1 << 20
    assert ckpt.SaveOptions.resolve(None, chunk_bytes=2 << 20).chunk_bytes == 2 << 20


def test_no_module_reads_a_ckpt_variable_itself():
    root = Path(ckpt.__file__).parent
    pending: set[str] = set()
    readers = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel == "_config.py" or rel in pending:
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"(os\.environ|getenv)\b.*CKPT_", line):
                readers.append(f"{rel}:{i}: {line.strip()}")
    assert not readers, readers


def _nice_of_a_background_thread(monkeypatch, value):
    import os
    import threading

    if value is not None:
        monkeypatch.setenv("CKPT_BACKGROUND_NICE", value)
    out = []

    def body():
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        _config.lower_this_thread()
        out.append((before, os.getpriority(os.PRIO_PROCESS, tid)))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return out[0]


@pytest.mark.skipif(not hasattr(__import__("os"), "setpriority") or not __import__("sys").platform.startswith("linux"),
                    reason="per-thread priorities are Linux's")
def test_background_threads_run_at_a_lower_priority_than_the_training_loop(monkeypatch):
    import os

    main = os.getpriority(os.PRIO_PROCESS, 0)
    before, after = _nice_of_a_background_thread(monkeypatch, None)
    assert before == main and after == min(19, main + 10)  # the default: 10 lower
    assert os.getpriority(os.PRIO_PROCESS, 0) == main  # the calling thread is untouched
    before, after = _nice_of_a_background_thread(monkeypatch, "0")
    assert after == before  # 0 turns it off


@pytest.mark.skipif(not hasattr(__import__("os"), "setpriority") or not __import__("sys").platform.startswith("linux"),
                    reason="per-thread priorities are Linux's")
def test_only_the_memory_tiers_writer_threads_are_lowered_and_never_twice(tmp_path, monkeypatch):
    """A persistent save's writers keep the loop's priority (the next save would wait for
    them); the memory tier's run CKPT_BACKGROUND_NICE lower (a busy tier skips a step),
    also where a lowered thread starts them (they inherit its priority)."""
    import os
    import threading

    import ckpt
    from ckpt._engine._direct_write import DirectWriter
    from ckpt.elastic import MemoryTier
    from ckpt.storage import open_storage

    monkeypatch.setenv("CKPT_BACKGROUND_NICE", "4")
    main = os.getpriority(os.PRIO_PROCESS, 0)
    assert ckpt.Snapshotter().background_nice == 0
    tier = MemoryTier(str(tmp_path / "run"), MemoryTierOptions(node_dir=str(tmp_path / "node"), replicas=0))
    assert tier.snapshotter.background_nice == 4
    tier.close()

    def writer_nice(nice: int) -> int:
        w = DirectWriter.for_storage(open_storage(str(tmp_path)), nice=nice)
        assert w is not None
        try:
            return w.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
        finally:
            w.close()

    assert writer_nice(0) == main
    assert writer_nice(4) == min(19, main + 4)
    out: list[int] = []

    def lowered_parent() -> None:  # the tier's Writer thread starts the write threads
        _config.lower_this_thread(4)
        out.append(writer_nice(4))

    t = threading.Thread(target=lowered_parent)
    t.start()
    t.join()
    assert out == [min(19, main + 4)]  # inherited 4, not lowered to 8
