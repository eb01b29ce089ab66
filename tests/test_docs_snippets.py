"""Every ```python block of README.md and docs/*.md runs (docs/bench/ holds figures, not code).

A snippet runs in a fresh temporary directory, so its relative paths (``runs/a``) are
local. What it may assume is said by an HTML comment on the line before its fence:

- ``<!-- snippet: setup=NAME -->``: run :data:`SETUP` ``[NAME]`` first (a small model, a
  Lightning module, a tiny Hugging Face model: what the prose calls ``model``...);
- ``<!-- snippet: continue -->``: run in the namespace and directory of the previous
  snippet of the same file (a page that builds one example over several blocks);
- ``<!-- snippet: skip REASON -->``: not run; kept for what cannot run here (several
  nodes, an S3 endpoint). :data:`SKIPS_ALLOWED` caps how many there are.

A snippet with none of these runs on its own, as a reader would paste it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # not docs/bench/
SKIPS_ALLOWED = 2

_FENCE = re.compile(r"^(?:<!-- snippet: (?P<mark>[^>]*?) -->\n)?```python\n(?P<code>.*?)^```$",
                    re.MULTILINE | re.DOTALL)

_TORCH = """
import torch
import ckpt
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
x, y = torch.randn(32, 8), torch.randn(32, 4)
loss_fn = torch.nn.functional.mse_loss
total_steps = 12
"""

_LIGHTNING = """
import logging
import torch
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
import ckpt
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

class LitModel(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    def training_step(self, batch, _i):
        return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

class Data(L.LightningDataModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)),
                          batch_size=8)

torch.manual_seed(0)
model, datamodule = LitModel(), Data()
"""

_HF = """
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
import ckpt

class Tokens(torch.utils.data.Dataset):
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    def __len__(self):
        return len(self.ids)
    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
train_dataset = Tokens()
"""

_FORMAT = """
import torch
import ckpt
torch.manual_seed(0)
ckpt.save({"model": torch.nn.Linear(512, 512).to(torch.bfloat16)}, "runs/a/step-000000100")  # an array entry
"""

#: The preambles a snippet may ask for with ``<!-- snippet: setup=NAME -->``.
SETUP = {"torch": _TORCH, "lightning": _LIGHTNING, "hf": _HF, "format": _FORMAT}


@dataclass
class Snippet:
    page: Path
    line: int
    code: str
    mark: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def snippets(page: Path) -> list[Snippet]:
    text = page.read_text()
    return [Snippet(page, text.count("\n", 0, m.start("code")), m.group("code"), (m.group("mark") or "").strip())
            for m in _FENCE.finditer(text)]


ALL = [s for p in PAGES for s in snippets(p)]


def test_every_python_fence_is_found() -> None:
    """The pattern sees every ```python fence (one it missed would never run)."""
    for page in PAGES:
        assert page.read_text().count("```python\n") == len(snippets(page)), page
        fences = [line for line in page.read_text().splitlines() if line.startswith("```")]
        assert len(fences) % 2 == 0 and set(fences[1::2]) <= {"```"}, (page, fences)  # each one closed
    assert len(ALL) >= 10
    skips = [s.id for s in ALL if s.mark.startswith("skip")]
    assert len(skips) <= SKIPS_ALLOWED, skips
    for s in ALL:
        assert re.fullmatch(r"|continue|setup=\w+|skip \S.*", s.mark), (s.id, s.mark)
        assert not s.mark.startswith("setup=") or s.mark[6:] in SETUP, (s.id, s.mark)


_spaces: dict[Path, tuple[dict[str, Any], Path]] = {}


@pytest.mark.parametrize("snip", ALL, ids=[s.id for s in ALL])
def test_snippet_runs(snip: Snippet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if snip.mark.startswith("skip"):
        pytest.skip(snip.mark)
    if snip.mark == "continue":
        assert snip.page in _spaces, f"{snip.id}: 'continue' needs an earlier snippet of the page that ran"
        ns, cwd = _spaces[snip.page]
    else:
        ns, cwd = {"__name__": "__snippet__"}, tmp_path
        if snip.mark.startswith("setup="):
            monkeypatch.chdir(cwd)
            monkeypatch.setenv("CKPT_NODE_DIR", os.fspath(cwd / "node"))
            exec(compile(SETUP[snip.mark[6:]], f"<setup {snip.mark[6:]}>", "exec"), ns)
    _spaces.pop(snip.page, None)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("CKPT_NODE_DIR", os.fspath(cwd / "node"))  # the memory tier's, not /dev/shm's
    exec(compile(snip.code, snip.id, "exec"), ns)
    _spaces[snip.page] = (ns, cwd)


def test_relative_links_point_at_files() -> None:
    """A guide moved or renamed leaves no dead link in the README or the guides."""
    for page in [*PAGES, *sorted((ROOT / "docs" / "bench").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), (page.relative_to(ROOT), target)


def test_readme_cli_at_a_glance_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Each ``ckpt ...`` line of the README's command-line block exits 0, in order, on a
    small checkpoint at the path the block names."""
    import shlex

    import torch

    import ckpt
    from ckpt._cli.main import main

    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Command line at a glance"):]
    block = block[block.index("```sh\n") + 6:]
    block = block[:block.index("```")]
    commands = [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.strip()]
    assert len(commands) >= 8 and all(c[0] == "ckpt" for c in commands), commands
    monkeypatch.chdir(tmp_path)
    ckpt.save({"model": torch.nn.Linear(16, 16)}, "runs/demo/step-000000300", step=300)
    for argv in commands:
        assert main(argv[1:]) == 0, (argv, capsys.readouterr())
