# The README's two commands: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.ckpt-installed

.PHONY: setup test test-fast demo demo-ft bench scale lint docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, the way this machine allows: a CPU wheel of 2.13.0 lies on disk.
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[s3,dev,ft]"
	touch $(STAMP)

test: setup
	$(VPY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: setup
	$(VPY) examples/demo.py

demo-ft: setup  # survivors keep training under torchft; a group back on fewer ranks heals through ckpt
	$(VPY) examples/demo_ft.py $(DEMO_FT_ARGS)

bench: setup
	$(VPY) -m bench $(BENCH_ARGS)

scale: setup  # planner costs at W simulated ranks, ckpt vs DCP (bench/scale.py)
	$(VPY) -m bench.scale $(SCALE_ARGS)

lint: setup
	$(VPY) -m ruff check ckpt tests bench examples
	$(VPY) -m mypy
	$(VPY) tests/test_import_cycles.py  # fails on a cycle between ckpt modules
	$(VPY) tests/test_private_access.py  # fails where a module touches another's private fields
	$(VPY) -m vulture ckpt tests tests/vulture_allow.py --min-confidence 80  # dead code; allow-list in tests/vulture_allow.py

docs: setup  # the guides and the API reference (mkdocs.yml); warnings are errors
	$(VPY) -m mkdocs build --strict  # not --quiet: it hides the warnings strict counts

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache
