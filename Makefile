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

demo: install
	$(VENV)/bin/autotune recommend --model DeepSeek-R1-Distill-Qwen-32B --gpu H200 --gpus 8

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/sim_speed.py
	$(PY) bench/accuracy.py
