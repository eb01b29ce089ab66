"""Storage backends, looked up by URL.

``open_storage("s3://bucket/run")`` returns a :class:`Storage`; every backend passes the
same conformance suite (``tests/storage``).
"""

from ckpt.storage._base import Capabilities, ObjectInfo, Storage
from ckpt.storage._registry import (
    open_storage,
    register_storage,
    registered_schemes,
    split_checkpoint_url,
)

__all__ = [
    "Storage",
    "Capabilities",
    "ObjectInfo",
    "open_storage",
    "register_storage",
    "registered_schemes",
    "split_checkpoint_url",
]
