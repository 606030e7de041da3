# RecForge: `make run` and `make test` are all a newcomer needs; both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The CPU wheel of torch is installed before anything else: an unpinned resolve would pull
# several GB of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= cpu,dev,spark

.PHONY: install system-packages run repro dvc-yaml serve mlflow mlflow-ui deploy test test-slow bench bench-real bench-gpu clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@$(MAKE) --no-print-directory system-packages
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# PostgreSQL (the event store's backend for several service replicas, and its tests): Debian's
# package, installed where it is missing and this can (root, apt-get). Elsewhere the PostgreSQL
# tests skip, saying how to install it. Java 17+ for the Spark engine (data.engine: spark) the
# same way: Debian's openjdk-17-jre-headless where no Java 17+ is found (a distribution's default
# JRE may be 11); elsewhere the Spark tests skip, saying how.
system-packages:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing PostgreSQL (apt-get install postgresql)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq postgresql >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; }; \
	else echo "PostgreSQL not found and not installable here: its tests will skip (apt-get install postgresql)"; fi
	@if java -version 2>&1 | grep -Eq 'version "(1[7-9]|[2-9][0-9])'; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Java 17 for Spark (apt-get install openjdk-17-jre-headless)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq openjdk-17-jre-headless >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null; } || \
	    echo "openjdk-17-jre-headless could not be installed: the Spark engine's tests will fail in CI"; \
	else echo "Java 17+ not found and not installable here: the Spark engine's tests will skip (see README: Spark)"; fi

# The main job on the built-in dataset: the Prefect training flow (validate -> ... -> register),
# ending with the metrics table and the registered model. `make repro` runs the same stages with
# DVC (no registration). PRESET=presets/movielens-100k.yaml for a real dataset.
PRESET ?=
run: install
	$(PY) -m flows.training $(if $(PRESET),--params-overrides $(PRESET))

repro: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro
	$(PY) -m components.evaluate --show

# dvc.yaml is generated from components/pipeline.py (a test fails when they differ).
dvc-yaml: install
	$(PY) -m components.pipeline dvc

# The service on the registry's champion (falls back to the last cached bundle); SERVE_ARGS to
# override, e.g. make serve SERVE_ARGS="--bundle artifacts/bundle".
SERVE_ARGS ?= --model-name recforge-recommender
serve: install
	$(PY) -m serving.app $(SERVE_ARGS)

mlflow: install
	PYTHON=$(CURDIR)/$(PY) bash mlflow/server.sh

mlflow-ui: install
	$(PY) -m mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db --host 127.0.0.1 --port 5000

# Work pool + deployment of prefect.yaml + a worker (needs a Prefect server: `prefect server start`
# and PREFECT_API_URL). Runs execute in this checkout.
deploy: install
	$(VENV)/bin/prefect work-pool create recforge-process --type process --overwrite
	$(VENV)/bin/prefect --no-prompt deploy --all
	$(VENV)/bin/prefect deployment ls
	$(VENV)/bin/prefect worker start --pool recforge-process

test: install
	$(PY) -m pytest -m "not slow" -q

test-slow: install
	$(PY) -m pytest -m slow -q

bench: install
	$(PY) -m benchmarks.quality --dataset synthetic --models popularity,mf --out artifacts/bench/quality-synthetic.json
	$(PY) -m benchmarks.scaling --out artifacts/bench/scaling.json

# The real datasets (../shared/datasets): quality of every model, the compression trade-off, and
# the online replay.
bench-real: install
	$(PY) -m benchmarks.quality --dataset movielens-100k --models popularity,mf,bert,bert-cloze,bert-id-only,fused --out artifacts/bench/quality-movielens-100k.json
	# The Amazon preset fine-tunes only: its bert is the no-pretrain ablation.
	$(PY) -m benchmarks.quality --dataset amazon-scientific --models popularity,mf,bert,bert-id-only,fused --out artifacts/bench/quality-amazon-scientific.json
	$(PY) -m benchmarks.compression --dataset movielens-100k --out artifacts/bench/compression.json
	$(PY) -m benchmarks.online --out artifacts/bench/online.json

# The GPU paths (benchmarks/README.md): the input folder is exported here from the real datasets,
# then measured on this machine's GPU. Where the GPU machine has no project install, carry
# artifacts/gpu-input there and run the second command with its python.
bench-gpu: install
	$(PY) -m benchmarks.gpu export --out artifacts/gpu-input
	$(PY) -m benchmarks.gpu run --input artifacts/gpu-input --out artifacts/bench/gpu.json

# Everything generated, but the tracked metrics (artifacts/metrics/).
clean:
	find artifacts -mindepth 1 -maxdepth 1 ! -name metrics -exec rm -rf {} + 2>/dev/null || true
	rm -rf .dvc/cache .dvc/tmp
