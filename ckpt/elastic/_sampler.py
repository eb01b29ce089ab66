"""A distributed batch sampler whose position is global, so a job that changes world
size mid-epoch consumes each remaining sample of the epoch exactly once.

Each global step takes the next ``world_size * batch_size`` samples of the epoch's
permutation; rank r takes the r-th slice of that block. The state is the epoch and the
number of samples all ranks together have consumed — the same on every rank, so it is
saved once and means the same thing on any world size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class ElasticSampler:
    """Yields this rank's batches (lists of sample indices) for the current epoch.

    ``len(dataset)`` samples, ``batch_size`` per rank per step; ``shuffle`` with a
    ``seed`` (the permutation of epoch e depends only on seed and e). Use it as a
    DataLoader ``batch_sampler`` with ``num_workers=0`` (or iterate it directly): the
    position counts batches handed out, so prefetching loaders would run ahead of it.
    The final step of an epoch splits the remaining samples as evenly as possible;
    a rank may then get fewer (or zero) samples.
    """

    def __init__(self, dataset_len: int, batch_size: int, *, rank: int | None = None,
                 world_size: int | None = None, shuffle: bool = True, seed: int = 0) -> None:
        if dataset_len < 0 or batch_size < 1:
            raise ValueError("dataset_len must be >= 0 and batch_size >= 1")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.consumed = 0  # samples of this epoch consumed by all ranks together
        self._perm: tuple[int, torch.Tensor] | None = None  # batch()'s epoch and its permutation
        self.set_world(rank, world_size)

    def set_world(self, rank: int | None = None, world_size: int | None = None) -> None:
        import torch.distributed as dist

        if world_size is None:
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.rank, self.world_size = rank, world_size

    def permutation(self, epoch: int | None = None) -> torch.Tensor:
        e = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
        return torch.randperm(self.dataset_len, generator=g)

    def _slice(self, start: int, remaining: int) -> tuple[int, int]:
        block = min(remaining, self.world_size * self.batch_size)
        base, extra = divmod(block, self.world_size)
        lo = start + self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

    def steps_left(self) -> int:
        left = self.dataset_len - self.consumed
        return -(-left // (self.world_size * self.batch_size)) if left > 0 else 0

    def __len__(self) -> int:
        return self.steps_left()

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.permutation()
        while self.consumed < self.dataset_len:
            remaining = self.dataset_len - self.consumed
            lo, hi = self._slice(self.consumed, remaining)
            self.consumed += min(remaining, self.world_size * self.batch_size)
            yield perm[lo:hi].tolist()
        self.epoch += 1
        self.consumed = 0

    def batch(self) -> list[int]:
        """This rank's samples of the step at the current position, without moving it: for
        a step that may roll back (torchft). Call ``advance()`` once the step commits; a
        step that rolls back is served again, split over the world of the retry."""
        remaining = self.dataset_len - self.consumed
        if remaining <= 0:
            return []
        lo, hi = self._slice(self.consumed, remaining)
        if self._perm is None or self._perm[0] != self.epoch:
            self._perm = (self.epoch, self.permutation())
        return self._perm[1][lo:hi].tolist()

    def advance(self) -> None:
        """The step ``batch()`` served committed: the whole world's block of it is consumed
        (the last block of an epoch starts the next epoch)."""
        remaining = self.dataset_len - self.consumed
        self.consumed += max(0, min(remaining, self.world_size * self.batch_size))
        if self.consumed >= self.dataset_len and self.dataset_len:
            self.epoch += 1
            self.consumed = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "dataset_len": self.dataset_len, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["dataset_len"] != self.dataset_len or state["shuffle"] != self.shuffle:
            from ckpt.errors import ReshardError

            raise ReshardError(
                f"sampler saved over {state['dataset_len']} samples (shuffle={state['shuffle']}), "
                f"now {self.dataset_len} (shuffle={self.shuffle})", key="sampler",
                hint="build the sampler over the same dataset")
        self.epoch, self.consumed, self.seed = state["epoch"], state["consumed"], state["seed"]
