# `make demo` and `make test` install what they need into .venv/ on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DALI_STAMP := $(VENV)/.dali-installed

.PHONY: install test lint demo clean-venv

$(STAMP): setup.py pyproject.toml requirements.txt constraints.txt moco_d2/install_detectron2.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m moco_d2.install_detectron2
	touch $(STAMP)

install: $(STAMP)

# DALI (requirements-dali.txt) is for the tests of the benchmarks' peer feed only. Where pip has
# no wheel for it (aarch64, macOS) those tests skip; no stamp is left, so the next run tries again.
$(DALI_STAMP): $(STAMP) requirements-dali.txt
	$(PY) -m pip install --quiet -c constraints.txt -r requirements-dali.txt && touch $@ \
		|| echo "note: DALI did not install (no wheel for this platform?); its tests will skip"

test: $(STAMP) $(DALI_STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

demo: $(STAMP)
	$(PY) tools/demo.py

clean-venv:
	rm -rf $(VENV)
