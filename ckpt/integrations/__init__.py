"""Plugins that make ckpt the checkpoint format of training frameworks (Lightning, Hugging Face, DCP)."""
