# kllama: two commands do everything on a fresh machine.
#   make demo  -- install into .venv, build a tiny MoE model, DPO-train it on the bundled data (CPU), chat with it
#   make test  -- install into .venv (with test extras) and run the test suite
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kllama-installed
# Without an NVIDIA GPU, take the CPU build of torch (a bare `torch` requirement would pull a multi-GB CUDA build).
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
CPU_TORCH ?= torch==2.13.0

.PHONY: install test demo clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
ifneq ($(HAS_GPU),yes)
	$(PY) -m pip install --quiet "$(CPU_TORCH)"
endif
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m kllama.demo

clean-venv:
	rm -rf $(VENV)
