# recscale — every entry point a user needs. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default. GPU users: install your CUDA build of torch into $(VENV) first; `make install` keeps a CUDA
# torch it finds there (and says so) unless you set TORCH_SPEC yourself (any pip requirement; empty = keep torch).
TORCH_SPEC ?= torch==2.13.0
DEMO_DATA ?= prepared/criteo_sample
# Targets that only run recscale (grid, report, mlflow) use the recscale of $(VENV), else the one on PATH (conda, uv,
# a GPU venv), and install only when neither exists: they never reinstall or replace torch.
RECSCALE := $(or $(wildcard $(VENV)/bin/recscale),$(shell command -v recscale 2>/dev/null))
MLFLOW := $(or $(wildcard $(VENV)/bin/mlflow),$(shell command -v mlflow 2>/dev/null))
NEED_INSTALL = $(if $(RECSCALE),,install)
RECSCALE_BIN = $(or $(RECSCALE),$(VENV)/bin/recscale)
MLFLOW_BIN = $(or $(MLFLOW),$(VENV)/bin/mlflow)

.PHONY: install demo test test-slow test-all bench clean-demo grid grid-sigir grid-data-fraction grid-roblock grid-roblock-ablation \
	mlflow report slurm-up slurm-down

install: $(VENV)/.recscale-installed

$(VENV)/.recscale-installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@cuda=$$($(PY) -c "import torch; print(torch.version.cuda or '')" 2>/dev/null); \
	if [ -n "$$cuda" ] && [ "$(origin TORCH_SPEC)" = "file" ]; then \
		echo "make: keeping the CUDA $$cuda build of torch in $(VENV); the default TORCH_SPEC=$(TORCH_SPEC) (a CPU wheel)" \
			"was not installed (set TORCH_SPEC=... to choose torch yourself)" >&2; \
	elif [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

demo: install
	$(VENV)/bin/recscale prepare criteo --input data/criteo/sample.train --output $(DEMO_DATA) --overwrite
	$(VENV)/bin/recscale fit --config configs/dcnv2_me10x.yaml --config configs/data/criteo_sample.yaml \
		--trainer.max_epochs 3 --trainer.logger.init_args.run_name demo-dcnv2-me10x
	@echo "Runs are in the local MLflow store: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db"

# the default suite, two worker processes (pytest-xdist) on two cores: under 10 minutes
test: install
	$(PY) -m pytest -q -n 2

# only the tests marked `slow` (each over ~10 s: heavy config smoke runs, DDP, the real-SLURM grid); CI runs them too
test-slow: install
	$(PY) -m pytest -q -m "slow and not gpu"

# everything this machine can run (the `gpu` tests skip without CUDA)
test-all: install
	$(PY) -m pytest -q -m ""

bench: install
	$(PY) bench/prepare_bench.py
	$(PY) bench/loader_bench.py
	$(PY) bench/train_bench.py --rounds 2
	$(PY) bench/diagnostics_bench.py

clean-demo:
	rm -rf $(DEMO_DATA)

# ---------------------------------------------------------------- the scaling grid (ICML 2024 Table 1 and friends)
# make grid DATASET=criteo [MODELS=dnn,dcnv2] [MODES=SE,ME] [SCALES=1,10] [SEEDS=0] [EXTRA="--trainer.max_epochs 5"]
#           [GPUS=0,1,2,3] [DRY_RUN=1]; `make -j N grid` runs N cells at once (one GPU each with GPUS).
# On a SLURM cluster: make grid LAUNCHER=slurm [SLURM_OPTS="--slurm-partition gpu --slurm-time 24:00:00 ..."]
# submits the grid as one job array (see README, "Running the grid on a SLURM cluster"); STATUS=1 prints progress.
DATASET ?= criteo
MODES ?= SE,ME
SCALES ?= 1,2,3,4,10
SEEDS ?= 0,1,2
JOBS = $(or $(patsubst -j%,%,$(filter -j%,$(MAKEFLAGS))),1)
GRID = $(RECSCALE_BIN) grid --dataset $(DATASET) --seeds "$(SEEDS)" -j $(JOBS) $(if $(GPUS),--gpus "$(GPUS)") \
	$(if $(DRY_RUN),--dry-run) $(if $(MODELS),--models "$(MODELS)") \
	$(if $(LAUNCHER),--launcher $(LAUNCHER)) $(SLURM_OPTS) $(if $(STATUS),--status)

grid: $(NEED_INSTALL)
	$(GRID) icml24 --modes "$(MODES)" --scales "$(SCALES)" $(EXTRA)

grid-sigir: $(NEED_INSTALL)
	$(GRID) sigir $(EXTRA)

grid-data-fraction: $(NEED_INSTALL)
	$(GRID) data-fraction $(EXTRA)

# RoBlock (ROBLOCK.md E1/E2): make grid-roblock DATASET=criteo [BACKBONES=dcnv2,xdeepfm,dhen] [DEPTHS=1,2,4,8]
#   [WIDTHS=1,4] (embedding sets) [BETAS=0,0.1,0.5,1] [SEEDS=0,1,2] [GPUS=...] [DRY_RUN=1]; plain + one RoBlock cell per beta
#   [ROUTER=factorized] (the RoBlock cells' router; default: the configs' dense `dynamic` one)
# E4 ablations at one operating point: make grid-roblock-ablation [AT=dcnv2,4,4,0.1] [KS=1,2,4,8]
#   (on/off cells, K, and router / rebalancing / HSIC-kernel swaps; EXTRA=--no-variants leaves the swaps out)
BACKBONES ?= dcnv2,xdeepfm,dhen
DEPTHS ?= 1,2,4,8
WIDTHS ?= 1,4
BETAS ?= 0,0.1,0.5,1
grid-roblock: $(NEED_INSTALL)
	$(GRID) roblock --backbones "$(BACKBONES)" --depths "$(DEPTHS)" --widths "$(WIDTHS)" --betas "$(BETAS)" \
		$(if $(ROUTER),--router $(ROUTER)) $(EXTRA)

grid-roblock-ablation: $(NEED_INSTALL)
	$(GRID) roblock-ablation $(if $(AT),--at "$(AT)") $(if $(KS),--ks "$(KS)") $(if $(ROUTER),--router $(ROUTER)) $(EXTRA)

# make report [DATASET=avazu] [FILTER="model=DCNv2 mode=ME"] (each TAG=VALUE becomes a --filter)
report: $(NEED_INSTALL)
	$(RECSCALE_BIN) report --dataset $(DATASET) $(foreach f,$(FILTER),--filter $(f))

# ---------------------------------------------------------------- a local MLflow tracking server
MLFLOW_PORT ?= 5000
# MLFLOW_HOST=0.0.0.0 serves other machines too (e.g. the nodes of a SLURM cluster)
MLFLOW_HOST ?= 127.0.0.1
mlflow: $(NEED_INSTALL)
	@mkdir -p mlruns/server-artifacts
	@echo "MLflow tracking server on http://$(MLFLOW_HOST):$(MLFLOW_PORT) -- in another shell:"
	@echo "    export MLFLOW_TRACKING_URI=http://$(if $(filter 0.0.0.0,$(MLFLOW_HOST)),$$(hostname -f),$(MLFLOW_HOST)):$(MLFLOW_PORT)"
	$(MLFLOW_BIN) server --backend-store-uri sqlite:///$(CURDIR)/mlruns/server.db \
		--artifacts-destination $(CURDIR)/mlruns/server-artifacts --host $(MLFLOW_HOST) --port $(MLFLOW_PORT)

# ---------------------------------------------------------------- a one-node SLURM cluster on this machine (root)
# for trying `make grid LAUNCHER=slurm` and for the SLURM tests (tests/test_slurm.py); see scripts/slurm/up.sh
slurm-up:
	bash scripts/slurm/up.sh

slurm-down:
	bash scripts/slurm/down.sh
