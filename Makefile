# Course commands. Two matter most (see README):
#   make lab    set everything up, then open the course in JupyterLab
#   make test   set everything up, then run every test (library, notebooks, grading)
# Set-up is a virtual environment in .venv, made once and refreshed only when
# pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed
LAB    ?= lab00_warmup
PORT   ?= 8888
LAB_ARGS ?=
# JupyterLab refuses to run as root (containers, CI) unless told to.
ROOT_ARGS := $(if $(filter 0,$(shell id -u)),--allow-root)
PYTEST_ARGS ?=
# TORCH=cpu: PyTorch's CPU-only wheels (same versions, no ~3.2 GB of CUDA libraries) for a laptop
# without an NVIDIA GPU. Give it on the first `make lab`/`make setup` (or after `rm -rf .venv`).
TORCH  ?=
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
PIP_TORCH := $(if $(filter cpu,$(TORCH)),--extra-index-url $(TORCH_CPU_INDEX))

# nbgrader calls `alembic` as a subprocess: the venv's bin must be on PATH.
export PATH := $(BIN):$(PATH)

.PHONY: setup lab test test-fast test-seeds doctor sync release course grade sandbox-check proxy \
	clean-grading book browser-deps

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(PIP_TORCH) \
		-c constraints.txt -e '.[course,test,federated,hub,book]'
	@touch $(STAMP)

# deploy/local on JUPYTER_CONFIG_PATH: nbgrader's exchange is a folder of this checkout, so
# the Assignment List works without root (no "Error fetching courses!").
lab: setup
	JUPYTER_CONFIG_PATH=$(CURDIR)/deploy/local$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH} \
	$(BIN)/jupyter lab --notebook-dir=$(CURDIR) --port=$(PORT) $(ROOT_ARGS) $(LAB_ARGS)

# One torch thread per process: tests and notebook kernels share two cores, and
# oversubscribed threads made small tensor ops 5-10x slower there. Instead, TEST_WORKERS
# pytest processes (pytest-xdist, one per core) run test modules side by side; each module stays
# on one worker (--dist loadfile) so its module fixtures run once. TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadfile)
test: setup browser-deps
	OMP_NUM_THREADS=1 QLIB_FAST=1 QLIB_QUIET=1 $(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# Library tests only (no notebooks, no grading): seconds, for quick iteration.
test-fast: setup
	OMP_NUM_THREADS=1 QLIB_FAST=1 QLIB_QUIET=1 $(BIN)/python -m pytest -m "not notebook and not grading and not browser" $(PYTEST_ARGS)

# Library tests under several base seeds (tests/conftest.py seeds every test from
# QLIB_TEST_SEED; the default run uses 0). A failure names its seed, to rerun it alone.
SEEDS ?= 1 2 3 4 5
test-seeds: setup
	@for seed in $(SEEDS); do echo "== QLIB_TEST_SEED=$$seed"; \
		OMP_NUM_THREADS=1 QLIB_FAST=1 QLIB_QUIET=1 QLIB_TEST_SEED=$$seed $(BIN)/python -m pytest -q \
		-m "not notebook and not grading" $(PYTEST_ARGS) || exit 1; done

doctor: setup
	$(BIN)/python -m qlib doctor

# Notebooks from their .py sources, Colab setup cells, README course map.
# A fork for Colab: `make sync REPO=owner/name` points every badge and setup cell at it.
REPO ?=
sync: setup
	$(BIN)/python tools/sync.py $(if $(REPO),--repo $(REPO))

# Regenerate the student release labs/ from solutions/ (nbgrader generate_assignment).
release: setup
	$(BIN)/python tools/release.py

# Everything generated: notebooks, release, then the README map that links the release.
course: sync release
	$(BIN)/python tools/sync.py

# Instructor: autograde every submission of LAB in submitted/, write feedback, and export
# grades_LAB.csv (this lab only) and grades.csv (every lab in the gradebook).
# Works on a fresh clone: the lab is first registered in gradebook.db from solutions/ (its
# notebooks, grade cells and hidden tests), generated into a scratch folder so the committed
# labs/ is left as it is. JOBS grading processes share the class (qlib/grading.py); as root
# each submission runs in the sandbox of qlib/sandbox.py (`make sandbox-check`).
JOBS ?= 2
grade: setup
	@scratch=$$(mktemp -d) && \
	$(BIN)/nbgrader generate_assignment $(LAB) --force --log-level=WARN \
		--CourseDirectory.release_directory=$$scratch; rc=$$?; rm -rf $$scratch; exit $$rc
	$(BIN)/python -m qlib.grading autograde $(LAB) --jobs $(JOBS)
	$(BIN)/nbgrader generate_feedback $(LAB)
	$(BIN)/nbgrader export --to grades_$(LAB).csv --assignment=$(LAB)
	$(BIN)/nbgrader export --to grades.csv

# configurable-http-proxy (JupyterHub's proxy) from npm, into deploy/jupyterhub/.proxy
# (project-local, ignored by git): the JupyterHub test and a local hub use it.
CHP_VERSION ?= 4.6.3
proxy: deploy/jupyterhub/.proxy/node_modules/.bin/configurable-http-proxy

deploy/jupyterhub/.proxy/node_modules/.bin/configurable-http-proxy:
	npm install --no-audit --no-fund --prefix deploy/jupyterhub/.proxy configurable-http-proxy@$(CHP_VERSION)

# The course website: lessons executed in fast mode (reusing the executed copies the notebook
# tests leave in _build/executed), labs as released, a search box. Open _build/book/_build/html/index.html.
book: setup
	OMP_NUM_THREADS=1 $(BIN)/python tools/book.py

# tests/test_browser.py drives Debian's chromium: install it where missing and we are root
# (apt); otherwise that test skips and says what to install.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium for the browser test (apt-get)"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } || \
		echo "could not install chromium: tests/test_browser.py will skip"; \
	else echo "chromium missing (not root): tests/test_browser.py will skip"; fi; }

# Can this machine grade in the sandbox? Prints yes, or why not and what to do.
sandbox-check: setup
	@$(BIN)/python -c "from qlib.sandbox import sandbox_problem as p; m = p(); print('grading sandbox: ' + (m or 'available')); raise SystemExit(1 if m else 0)"

clean-grading:
	rm -rf autograded feedback gradebook.db grades.csv grades_lab*.csv
