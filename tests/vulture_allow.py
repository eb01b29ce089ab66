"""Names that vulture (``make lint``) reports as unused but that a protocol requires.

Each name is used once here, so vulture counts it as used. Nothing imports this file."""

from __future__ import annotations

from typing import Any

_: Any = None

USED = (
    _.frame,  # ckpt/_manager.py: a signal handler takes (signum, frame)
    _.is_coordinator,  # ckpt/integrations/dcp.py: DCP's set_up_storage_* signature
    _.exitstatus,  # tests/conftest.py: pytest_sessionfinish's signature
    _.data_dir,  # tests/integrations/test_lightning.py: read by save_hyperparameters()
    _.dst_ranks,  # ckpt/integrations/torchft.py: torchft's CheckpointTransport.send_checkpoint signature
    _.src_rank,  # ckpt/integrations/torchft.py: torchft's CheckpointTransport.recv_checkpoint signature
)
