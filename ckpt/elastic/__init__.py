"""Elastic training: state that survives a change of world size.

Tensors reshard at load time (ckpt.load reads only the overlapping ranges). Per-rank
state needs a policy: :class:`ElasticSampler` keeps a global position, RNG streams are
kept by existing ranks and derived for new ones (ckpt.RNGState). :class:`MemoryTier`
keeps per-step snapshots in node-local shared memory, replicated to peer nodes, and
restores them onto a changed world size (``CheckpointManager(memory=MemoryTierOptions(...))``).
"""

from ckpt.elastic._recover import TierRestore
from ckpt.elastic._sampler import ElasticSampler
from ckpt.elastic._tier import MemoryTier, MemoryTierWarning, TierStats

__all__ = ["ElasticSampler", "MemoryTier", "MemoryTierWarning", "TierStats", "TierRestore"]
