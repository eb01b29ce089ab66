"""Checkpoint tools: the library behind the ``ckpt`` command line.

    from ckpt import tools

    tools.ls("runs/a")                                  # checkpoints of a run, newest first
    tools.info("runs/a/step-000000100")                 # entries, layout, totals, versions
    report = tools.verify("runs/a/step-000000100")      # every chunk read, crc32c checked
    tools.cp("runs/a/step-000000100", "s3://bucket/a/") # copy between storages, manifest last
    tools.gc("runs/a", keep_last=3)                     # debris of crashed saves + retention
    tools.export("runs/a/step-000000100", "out/", only="model")   # safetensors / torch files
    tools.import_("dcp_ckpt/", "runs/b/step-000000000")  # DCP, torch.save or safetensors -> ckpt
    tools.reshard("runs/a/step-000000100", "runs/a4/step-000000100", world_size=4)

Every function takes ``storage_options=`` (passed to :func:`ckpt.storage.open_storage`,
e.g. an S3 ``endpoint_url``) and returns plain data (dicts, lists, or a
:class:`VerifyReport` with ``to_dict()``) that the command prints as text or JSON.
Long operations accept ``progress``, a callable ``progress(bytes_done_now, total_bytes)``.
"""

from __future__ import annotations

from ckpt._tools._copy import cp, gc
from ckpt._tools._export import export
from ckpt._tools._import import import_
from ckpt._tools._inspect import info, ls
from ckpt._tools._reshard import reshard
from ckpt._tools._verify import Problem, VerifyReport, verify

__all__ = ["ls", "info", "verify", "VerifyReport", "Problem", "cp", "gc", "export", "import_", "reshard"]
