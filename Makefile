# seqvision — the README's two commands are `make demo` and `make test`.
# Each creates .venv and installs the pinned set (constraints.txt) when missing.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.seqvision-installed

# Offline-friendly defaults for the tools we drive (no telemetry, no phoning home).
export MLFLOW_DISABLE_TELEMETRY ?= true
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export PYTHONUNBUFFERED ?= 1
# dvc.yaml stage commands call `python`: make it the project's interpreter.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.DEFAULT_GOAL := help
.PHONY: help install demo test data notebook study lock bench bench-pipeline mlflow-ui clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# uv, with pip's indexes and constraints; pip when uv cannot (scripts/install.py)
	$(PY) scripts/install.py
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the pinned set

data: $(STAMP) ## generate the default synthetic benchmark into data/ and check it against data.dvc
	$(PY) -m seqvision.synth --out data --params params.yaml
	@# Caches data/ under .dvc/cache when it equals what data.dvc pins; refuses (and says so) when it differs.
	@$(VENV)/bin/dvc commit --quiet data.dvc </dev/null || { \
	  echo "data/ differs from data.dvc: the synth params or package versions differ from the pinned ones."; \
	  echo "If that is intended, run: dvc commit -f data.dvc && git add data.dvc"; exit 1; }
	@echo "data/ matches data.dvc"

# The comparison's last stage: `dvc repro report` runs every stage it needs. Not the study (make study): a plain
# `dvc repro` would run that too.
DEMO_STAGES ?= report

demo: $(STAMP) ## generate data/ if absent, then run the comparison (dvc repro report; not the study)
	@if [ ! -d data/annotations ]; then $(MAKE) --no-print-directory data; fi
	@# The Prefect server starts beside DVC; only a stage that runs waits for it (scripts/with-prefect-server).
	scripts/with-prefect-server $(VENV)/bin/dvc repro $(DEMO_STAGES)
	@echo ""
	@echo "Report:  $(abspath reports/report.html)  (self-contained; also reports/report.md)"
	@echo "Metrics: dvc metrics show    Plots: dvc plots show"
	@echo "MLflow:  make mlflow-ui  ->  http://127.0.0.1:$(MLFLOW_PORT)"
	@echo "Study:   make study (the seed's table, measured: reports/study.html; not part of make demo)"

test: $(STAMP) ## run the whole test suite
	$(PY) -m pytest -n 2 --dist loadgroup --durations=15

notebook: $(STAMP) ## run notebooks/walkthrough.ipynb on the last demo's artifacts -> notebooks/executed/walkthrough.ipynb
	$(PY) scripts/run_notebook.py --root . --out notebooks/executed/walkthrough.ipynb

bench: $(STAMP) ## run the speed benchmarks (results: docs/benchmarks.md)
	@for b in benchmarks/extract.py benchmarks/train_loop.py benchmarks/scan.py benchmarks/decoder.py; do echo "== $$b"; $(PY) $$b || exit 1; done

bench-pipeline: $(STAMP) ## orchestration share of a forced dvc repro, no-op repro, param-change reruns (runs the whole pipeline)
	$(PY) benchmarks/pipeline.py --docs docs/benchmarks.md --dvc-args "$(DEMO_STAGES)"

study: $(STAMP) ## the seed's table, measured (docs/study.md): dvc repro study_report -> reports/study.md (params.yaml study:)
	@if [ ! -d data/annotations ]; then $(MAKE) --no-print-directory data; fi
	scripts/with-prefect-server $(VENV)/bin/dvc repro study_report
	@echo ""
	@echo "Study:  $(abspath reports/study.html)  (self-contained; also reports/study.md)"
	@echo "MLflow: make mlflow-ui  ->  experiment seqvision-study"

MLFLOW_PORT ?= 5000
mlflow-ui: $(STAMP) ## browse every run in the MLflow UI at http://127.0.0.1:5000 (MLFLOW_PORT=...)
	$(VENV)/bin/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(abspath mlflow.db)}" \
	  --host 127.0.0.1 --port $(MLFLOW_PORT)

lock: $(STAMP) ## re-pin constraints.txt from the current .venv
	@{ head -n 2 constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^seqvision'; } > constraints.txt.tmp
	@mv constraints.txt.tmp constraints.txt

clean: ## remove pipeline outputs (artifacts/, reports/); never touches data/
	rm -rf artifacts reports
