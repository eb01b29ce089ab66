"""A source rank that dies mid-heal (ckpt's torchft transport, in one process: real HTTP
servers, a real TCPStore; the peer's death is its server dropping every box request).
Where another rank of the source group holds the same data (replicated state, e.g. DDP
inside a replica group) the heal goes on from it and says so; where none does, the heal
fails with an error that names the dead peer, and torchft heals again at the next quorum."""

from __future__ import annotations

import socket
import threading
from datetime import timedelta
from typing import Any

import pytest
import torch

pytest.importorskip("torchft")

from torch.distributed import TCPStore  # noqa: E402

from ckpt.errors import StorageError  # noqa: E402
from ckpt.integrations.torchft import CkptTransport  # noqa: E402
from tests.dist._launch import free_port  # noqa: E402

TIMEOUT = timedelta(seconds=20)


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 8, generator=g), "b": torch.randn(8, generator=g),
            "opt": {"step": seed, "lr": 0.1}}


def _dies_on_boxes(t: CkptTransport) -> None:
    """The peer's process is gone after it sent its index: its socket closes on every box."""
    real = t.server.handle

    def handle(h: Any) -> None:
        if "/boxes?" in h.path:
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        real(h)

    t.server.handle = handle  # type: ignore[method-assign]


def _sent(state: dict[str, Any]) -> dict[str, Any]:
    """What torchft's manager hands ``send_checkpoint``: the user's state and its own."""
    return {"user": {"default": state}, "torchft": {"step": 9, "batches_committed": 18}}


def _heal(dying: list[int], send_after: float | None = 0.0) -> tuple[dict[str, Any], CkptTransport,
                                                                      list[CkptTransport], dict[str, Any]]:
    port = free_port()
    master = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    source = _state(7)  # replicated: both source ranks hold the whole state
    sources = [CkptTransport(template=lambda: source, group_rank=r, group_world_size=2, store_addr="127.0.0.1",
                             store_port=port, chunk_bytes=256, prefix="src", timeout=TIMEOUT) for r in range(2)]
    for r in dying:
        _dies_on_boxes(sources[r])
    meta = [t.metadata() for t in sources][0]  # from here on each source serves its live state

    def send() -> None:  # torchft's quorum thread on the source ranks, racing the healer
        for t in sources:
            t.send_checkpoint([1], 9, _sent(source), TIMEOUT)

    sender = threading.Timer(send_after, send) if send_after is not None else None
    if sender is not None:
        sender.start()
    mine = _state(0)
    healer = CkptTransport(template=lambda: mine, group_rank=1, group_world_size=2, store_addr="127.0.0.1",
                           store_port=port, chunk_bytes=256, prefix="healer", timeout=TIMEOUT)
    try:
        got = healer.recv_checkpoint(0, meta, step=9, timeout=TIMEOUT)
    finally:
        if sender is not None:
            sender.join()
        for t in sources + [healer]:
            t.shutdown()
        del master
    return got, healer, sources, source


def test_a_dying_source_rank_fails_over_to_its_replica() -> None:
    got, healer, sources, source = _heal(dying=[1])  # the healer's rank 1 starts at source rank 1
    state = got["user"]["default"]
    assert torch.equal(state["w"], source["w"]) and torch.equal(state["b"], source["b"])
    assert state["opt"] == source["opt"]
    stats = healer.last_heal
    assert list(stats.failed_over) == [sources[1].server.url], stats.as_dict()
    assert stats.bytes == stats.share_bytes  # nothing counted twice: a part lands whole or not at all


def test_a_heal_whose_every_holder_died_names_them() -> None:
    with pytest.raises(StorageError) as e:
        _heal(dying=[0, 1])
    assert "died mid-heal" in e.value.message and e.value.message.count("http://127.0.0.1:") == 2
    assert e.value.key is not None and e.value.key.endswith("str:w")  # the first tensor it could not place


def test_a_healer_faster_than_the_sources_send_still_gets_torchfts_part() -> None:
    """The healer asks while the sources still serve their live state (torchft calls
    ``send_checkpoint`` a moment later): the tensors may come from the live state, but the
    skeleton waits for the sent one, whose "torchft" part torchft's manager loads; before,
    the heal returned without it and torchft failed with KeyError('torchft'), costing a
    quorum."""
    got, healer, _sources, source = _heal(dying=[], send_after=0.5)
    assert got["torchft"] == {"step": 9, "batches_committed": 18}
    assert torch.equal(got["user"]["default"]["w"], source["w"])
    assert healer.last_heal.failed_over == {}
