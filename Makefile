# recscale — every entry point a user needs. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default. GPU users: install your CUDA build of torch into $(VENV) first, then `make ... TORCH_SPEC=`
# (empty keeps the torch that is there), or set TORCH_SPEC to any pip requirement.
TORCH_SPEC ?= torch==2.13.0
DEMO_DATA ?= prepared/criteo_sample

.PHONY: install demo test test-all bench clean-demo

install: $(VENV)/.recscale-installed

$(VENV)/.recscale-installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

demo: install
	$(VENV)/bin/recscale prepare criteo --input data/criteo/sample.train --output $(DEMO_DATA) --overwrite
	$(VENV)/bin/recscale fit --config configs/dcnv2_me10x.yaml --config configs/data/criteo_sample.yaml \
		--trainer.max_epochs 3 --trainer.logger.init_args.run_name demo-dcnv2-me10x
	@echo "Runs are in the local MLflow store: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db"

test: install
	$(PY) -m pytest -q

# also the slow tests (marked `slow`)
test-all: install
	$(PY) -m pytest -q -m ""

bench: install
	$(PY) bench/prepare_bench.py
	$(PY) bench/loader_bench.py
	$(PY) bench/train_bench.py

clean-demo:
	rm -rf $(DEMO_DATA)
