"""Benchmarks of ckpt against torch.save and torch.distributed.checkpoint (``python -m bench``)."""
