"""Elastic training: state that survives a change of world size.

Tensors reshard at load time (ckpt.load reads only the overlapping ranges). Per-rank
state needs a policy: :class:`ElasticSampler` keeps a global position, RNG streams are
kept by existing ranks and derived for new ones (ckpt.RNGState).
"""

from ckpt.elastic._sampler import ElasticSampler

__all__ = ["ElasticSampler"]
