# One Smart Trade market-data pipeline. Every target sets up .venv itself on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt plugins/pyproject.toml | sha1sum | cut -c1-12)

BINANCE_HOST ?= https://data-api.binance.vision
BINANCE_ARCHIVE_HOST ?= https://data.binance.vision
SANDBOX_PORT ?= 8900
AIRFLOW_PORT ?= 8080
STATSD_HOST ?= localhost
STATSD_PORT ?= 9125

export AIRFLOW_HOME := $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__PARALLELISM := 4
export AIRFLOW__API__PORT := $(AIRFLOW_PORT)
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL := http://localhost:$(AIRFLOW_PORT)/execution/
# airflow standalone starts the scheduler together with the api-server: the first tasks' clients keep
# retrying (2-4 min) until it answers on /execution/, instead of failing a try with httpx.ConnectError
export AIRFLOW__WORKERS__EXECUTION_API_RETRIES ?= 25
export AIRFLOW__WORKERS__EXECUTION_API_RETRY_WAIT_MIN ?= 5
export AIRFLOW__WORKERS__EXECUTION_API_RETRY_WAIT_MAX ?= 10
export AIRFLOW__METRICS__STATSD_ON ?= True
export AIRFLOW__METRICS__STATSD_HOST := $(STATSD_HOST)
export AIRFLOW__METRICS__STATSD_PORT := $(STATSD_PORT)
# bare metric names, dag/task/pool as tags (labels after include/statsd/mapping.yml), as in airflow.env
export AIRFLOW__METRICS__LEGACY_NAMES_ON := False
export AIRFLOW__METRICS__STATSD_INFLUXDB_ENABLED := True
export AIRFLOW__LOGGING__LOGGING_LEVEL ?= $(or $(LOG_LEVEL),INFO)
export PYTHONPATH := $(CURDIR)
export PATH := $(BIN):$(PATH)

.PHONY: venv system-deps run demo seed test test-fast bench sandbox airflow-setup cluster cluster-stop cluster-status clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt plugins/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e plugins  # the Binance provider, editable (see plugins/pyproject.toml)
	$(BIN)/pip check
	rm -f $(VENV)/.installed-* && touch $@

# Idempotent: migrate, (re)create the pool and the binance_default connection.
airflow-setup: venv
	mkdir -p $(AIRFLOW_HOME) data
	airflow db migrate > $(AIRFLOW_HOME)/db-migrate.log 2>&1 || (cat $(AIRFLOW_HOME)/db-migrate.log; exit 1)
	airflow pools set $${BINANCE_POOL:-binance_api} $${BINANCE_POOL_SLOTS:-4} "Binance REST (every task calling Binance)" > /dev/null
	airflow connections delete binance_default > /dev/null 2>&1 || true
	airflow connections add binance_default --conn-type http --conn-host "$(BINANCE_HOST)" > /dev/null
	airflow connections delete binance_archive > /dev/null 2>&1 || true
	airflow connections add binance_archive --conn-type http --conn-host "$(BINANCE_ARCHIVE_HOST)" > /dev/null
	@echo "binance_default -> $(BINANCE_HOST); binance_archive -> $(BINANCE_ARCHIVE_HOST); pool $${BINANCE_POOL:-binance_api}; AIRFLOW_HOME=$(AIRFLOW_HOME)"

run: airflow-setup
	@$(BIN)/python -c "import sys, requests; requests.get('$(BINANCE_HOST)/api/v3/ping', timeout=5).raise_for_status()" 2>/dev/null \
	  || echo "Binance at $(BINANCE_HOST) is unreachable from here; starting anyway - for an offline demo use 'make demo'."
	@echo "Airflow UI on http://localhost:$(AIRFLOW_PORT) - user admin, password in $(AIRFLOW_HOME)/simple_auth_manager_passwords.json.generated"
	airflow standalone

# The same as run, against the local Binance sandbox (started here, stopped on exit).
demo: venv
	@mkdir -p $(AIRFLOW_HOME); \
	setsid $(BIN)/python -m include.binance_sandbox --port $(SANDBOX_PORT) > $(AIRFLOW_HOME)/sandbox.log 2>&1 & \
	SANDBOX_PID=$$!; echo $$SANDBOX_PID > $(AIRFLOW_HOME)/sandbox.pid; \
	trap 'kill -TERM -- -$$SANDBOX_PID 2>/dev/null; rm -f $(AIRFLOW_HOME)/sandbox.pid' EXIT INT TERM; \
	for i in $$(seq 1 100); do curl -fsS http://127.0.0.1:$(SANDBOX_PORT)/api/v3/ping > /dev/null 2>&1 && break; sleep 0.2; done; \
	echo "Binance sandbox on http://127.0.0.1:$(SANDBOX_PORT) (pid $$SANDBOX_PID)"; \
	AIRFLOW_CONN_BINANCE_DEFAULT='{"conn_type": "http", "host": "http://127.0.0.1:$(SANDBOX_PORT)"}' \
	AIRFLOW_CONN_BINANCE_ARCHIVE='{"conn_type": "http", "host": "http://127.0.0.1:$(SANDBOX_PORT)"}' \
	  $(MAKE) --no-print-directory seed || exit 1; \
	AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False $(MAKE) --no-print-directory run \
	  BINANCE_HOST=http://127.0.0.1:$(SANDBOX_PORT) BINANCE_ARCHIVE_HOST=http://127.0.0.1:$(SANDBOX_PORT)

# Recent history of every timeframe (ingested, curated) and the latest daily signal, so the
# demo shows data at once; the DAGs take over from there. Uses binance_default (make demo: the sandbox).
SIGNAL_DAY = $(shell date -u -d '-$(RECOMMENDATION_HOUR) hours' +%F)
RECOMMENDATION_HOUR ?= 12
seed: venv
	@mkdir -p data $(AIRFLOW_HOME)
	@for spec in "1w 730" "1d 120" "4h 20" "1h 10" "30m 3" "15m 3"; do set -- $$spec; \
	  echo "seed: $$1, last $$2 days"; \
	  $(BIN)/python -m include.market_data.ingestion $$1 $$(date -u -d "-$$2 days" +%F) now --curate > $(AIRFLOW_HOME)/seed-$$1.log || { cat $(AIRFLOW_HOME)/seed-$$1.log; exit 1; }; \
	done
	$(BIN)/python -m include.market_data.signal $(SIGNAL_DAY) > $(AIRFLOW_HOME)/seed-signal.json && \
	  echo "seed: signal of $(SIGNAL_DAY) in $${SIGNAL_DATA_DIR:-data/signals}/"

sandbox: venv
	$(BIN)/python -m include.binance_sandbox --port $(SANDBOX_PORT)

# What the cluster, metrics-chain and browser suites need from Debian, installed when missing
# (PostgreSQL runs as the postgres user; Prometheus and promtool; Redis; chromium for Playwright).
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
system-deps:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1 || command -v initdb > /dev/null || missing="$$missing postgresql"; \
	command -v redis-server > /dev/null || missing="$$missing redis-server"; \
	command -v prometheus > /dev/null && command -v promtool > /dev/null || missing="$$missing prometheus"; \
	command -v chromium > /dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing from Debian:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing > /dev/null; \
	fi

# Everything, the cluster, browser and fault-matrix suites included (CI runs this).
test: venv system-deps
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

# Daily work: everything but the suites marked slow (cluster, standalone + browser, fault matrix).
test-fast: venv
	$(BIN)/python -m pytest tests -q -p no:cacheprovider -m "not slow"

# The CeleryExecutor shape of docker-compose.yaml as local processes (include/cluster): PostgreSQL,
# Redis, api-server, scheduler, dag-processor, triggerer, 2 Celery workers and the sandbox (or
# BINANCE_HOST=https://... make cluster for real Binance), on free 127.0.0.1 ports, state in .cluster/.
cluster: venv system-deps
	$(BIN)/python -m include.cluster start $(if $(filter file,$(origin BINANCE_HOST)),,--binance-host $(BINANCE_HOST))

cluster-stop: venv
	$(BIN)/python -m include.cluster stop

cluster-status: venv
	$(BIN)/python -m include.cluster status

# The peer comparison and the deep-history benches come last (they take minutes: full histories).
bench: venv
	@for script in $(filter-out bench/peers.py bench/history.py,$(sort $(wildcard bench/*.py))) bench/peers.py bench/history.py; do \
	  echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(AIRFLOW_HOME) data .cluster
