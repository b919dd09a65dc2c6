# One command to set up and run the main job, one to run the tests (see README).
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: install demo test bench
install: $(VENV)/.installed

# The main job on the embedded simulator: a 40-trial study over every layout of a 32B model on 8 H200.
demo: install
	rm -rf studies/demo
	$(VENV)/bin/autotune run search_spaces/dense.yaml --study-dir studies/demo
	$(VENV)/bin/autotune best studies/demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/sim_speed.py
	$(PY) bench/accuracy.py
	$(PY) bench/search_efficiency.py
	$(PY) bench/tui_refresh.py
