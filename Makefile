# One-command set-up: `make demo` and `make test` both create .venv, install torch (CPU build,
# version overridable: `make test TORCH_VERSION=2.12.0`) and then the package with its dev tools.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(TORCH_VERSION)
DEMO_OUT := out/demo

.PHONY: setup test lint demo bench clean chromium docs docs-serve

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check nndiag tests benchmarks sample_runs docs

# tests/test_html_report.py opens the HTML report in headless Chromium from the system packages
# (installed once; skipped when /usr/bin/chromium exists).
chromium:
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)

test: setup lint chromium docs
	$(BIN)/python -m pytest

# The documentation site (mkdocs.yml, sources in docs/): `make docs` builds it into site/, strictly
# (a broken link or reference fails); `make docs-serve` serves it at http://127.0.0.1:8000 while
# you edit. The reference pages are generated from the code by docs/gen_reference.py.
# NO_MKDOCS_2_WARNING silences the theme's notice about a future MkDocs it does not support.
DOCS_ENV := NO_MKDOCS_2_WARNING=1

docs: setup
	$(DOCS_ENV) $(BIN)/mkdocs build --strict --quiet

docs-serve: setup
	$(DOCS_ENV) $(BIN)/mkdocs serve

# The main job on built-in models: a network that cannot train (20 stacked sigmoids), with
# every automatic fix applied to a copy and re-measured, a healthy ResNet for contrast, a
# learning-rate range test on a built-in classification problem, and the check and figures of a
# recorded run whose ReLUs died.
# Exit code 1 only means "findings were reported"; 2 or 3 would be a real failure.
demo: setup
	mkdir -p $(DEMO_OUT)
	$(BIN)/nndiag inspect --model nndiag.examples:deep_sigmoid_mlp --input-shape 64,32 \
		--try-fixes --plot $(DEMO_OUT)/deep_sigmoid_gradient_flow.png; test $$? -le 1
	$(BIN)/nndiag inspect --model nndiag.examples:resnet_bn --input-shape 16,3,32,32
	$(BIN)/nndiag lr-find --model nndiag.examples:he_mlp --data nndiag.examples:classification_data \
		--optimizer sgd --plot $(DEMO_OUT)/lr_find.png
	$(BIN)/nndiag check sample_runs/dying_relu; test $$? -le 1
	$(BIN)/nndiag report sample_runs/dying_relu --out $(DEMO_OUT)/dying_relu_report; \
		test $$? -le 1
	@echo "Figures: $(DEMO_OUT)/deep_sigmoid_gradient_flow.png $(DEMO_OUT)/lr_find.png $(DEMO_OUT)/dying_relu_report/"

bench: setup
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,bench]'
	$(BIN)/python benchmarks/inspect_overhead.py
	$(BIN)/python benchmarks/checkpoint_memory.py
	$(BIN)/python benchmarks/lr_find_quality.py
	$(BIN)/python benchmarks/lr_unseen.py
	$(BIN)/python benchmarks/monitor_overhead.py
	$(BIN)/python benchmarks/check_gate_time.py
	$(BIN)/python benchmarks/check_long_run.py

clean:
	rm -rf $(VENV) out site .pytest_cache .ruff_cache *.egg-info
