# Two entry points, both self-contained on a fresh machine:
#   make demo   create .venv, install, run every stage on mini-NSD with tiny models (CPU)
#   make test   same set-up, then ruff and the whole pytest suite (CPU, offline)
#   make web    after make demo: the web demo on the demo's models, http://127.0.0.1:$(WEB_PORT)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The stamp records a finished install; it is rebuilt only when a dependency file changes,
# so a second `make test` installs nothing.
STAMP  := $(VENV)/.installed
DEMO_DIR ?= demo_out
WEB_PORT ?= 7860

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TORCH_HOME := $(CURDIR)/.cache/torch

.PHONY: demo test lint setup clean web

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt requirements-dev.txt requirements-nodeps.txt constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" DEMO_DIR="$(DEMO_DIR)" bash scripts/demo.sh

# The demo's tiny unCLIP runs 8 denoising steps there, as in the demo (scripts/demo.sh, step 20).
web: $(STAMP)
	$(BIN)/python tools/web_demo.py --demo-dir "$(DEMO_DIR)" --steps 8 --port $(WEB_PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# One torch thread per test process unless the caller says otherwise: results compared bit for bit
# stay comparable, and a loaded CI machine is not slowed down by spinning OpenMP threads. TEST_WORKERS
# processes (pytest-xdist; 2 = the CPU machines' cores) share the suite, each test module on one of them.
TEST_WORKERS ?= 2
test: lint
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
