"""Implementation of :mod:`ckpt.tools` (the library behind the ``ckpt`` command)."""
