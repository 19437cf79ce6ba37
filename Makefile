# Two commands on a fresh machine (Python 3.10+, pip, make, git):
#   make demo   the main job
#   make test   the test suite without the tests marked slow (under 10 minutes on 2 cores)
#   make test-all   everything: make test, then make test-slow (what CI runs)
# Each bootstraps uv into .tools/ and the locked environment into .venv/ by itself.

PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
EXTRAS := --extra dev --extra detection --extra medical --extra plot --extra tensorboard --extra tracking-test --extra mpi --extra docs
STAMP := $(VENV)/.ratlib-synced
PYTEST_ARGS ?=

.PHONY: demo test test-slow test-all lint env venv lock build clean bench

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(STAMP): $(UV) pyproject.toml uv.lock
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen $(EXTRAS)
	# DeepSpeed builds against the torch installed by the first sync (no build isolation).
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen $(EXTRAS) --extra deepspeed
	touch $@

venv: $(STAMP)

# The main job: the study in examples/ablation/ablation.yaml (the segmentation UNet on its synthetic task),
# each run its own torchrun launch of 2 ranks on the CPU (gloo), from scratch in runs/ablation-demo; prints
# the summary table and the paths of the results. A GPU machine runs it on the CPU too (device=cpu).
demo: $(STAMP)
	rm -rf runs/ablation-demo
	OMP_NUM_THREADS=1 $(VENV)/bin/python examples/ablation/run.py --config examples/ablation/ablation.yaml \
		output_dir=runs/ablation-demo device=cpu
	@echo "compare the variants' curves: tensorboard --logdir runs/ablation-demo"

env: $(STAMP)
	$(VENV)/bin/ratlib env

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy  # ratlib/ and tests/typecheck/, as [tool.mypy] in pyproject.toml says

# The slow tests (real launchers and Slurm jobs, whole example runs under signals, the docs' example
# commands) are the other half of the suite's time; CI runs them after make test.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -m slow $(PYTEST_ARGS)

test-all: test test-slow

lock: $(UV)
	$(UV) lock

build: $(UV)
	$(UV) build

clean:
	rm -rf $(TOOLS) $(VENV) dist build .pytest_cache .hypothesis

# The documentation site (mkdocs.yml): pages of docs/, the README, the CHANGELOG, and the API reference made
# from the docstrings, built into site/ (strict: a broken link or reference, or a public name without a
# docstring, fails); docs-serve serves it on http://127.0.0.1:8000 and rebuilds on changes.
.PHONY: docs docs-serve test-oldest
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# The oldest torch pyproject.toml declares, with its torchvision, in .venv-oldest/, and the library's tests
# that are not slow (.ci/oldest-torch says which); .ci/run runs it after make test-slow.
test-oldest: $(UV)
	UV=$(UV) PYTHON=$(PYTHON) bash .ci/oldest-torch $(PYTEST_ARGS)
