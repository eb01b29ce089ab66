"""``python -m ckpt``: the ``ckpt`` command."""

from __future__ import annotations

import sys

from ckpt._cli.main import main

sys.exit(main())
