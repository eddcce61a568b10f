# The few commands people type. Everything installs itself into .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Only what .venv installs: requirements/upstream.txt is the upstream suite's own virtualenv.
STAMP := $(VENV)/.installed-$(shell cat requirements/base.txt requirements/dev.txt | cksum | cut -d' ' -f1)
ARGS ?=

.PHONY: run test bench soak chaos failover image image-smoke upstream lint format db stopdb clean

$(STAMP): requirements/base.txt requirements/dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
	@rm -f $(VENV)/.installed-*; touch $@

run: $(STAMP)  ## web on 127.0.0.1:8000 + one worker, on the embedded PostgreSQL unless DATABASE_URL is set
	$(BIN)/python scripts/dev.py run

test: $(STAMP)  ## the whole suite on real PostgreSQL (ARGS="-k enrich" to narrow it)
	$(BIN)/python scripts/dev.py test $(ARGS)

bench: $(STAMP)  ## the benchmark suite (bench/): one table, also in bench/results/latest.json
	$(BIN)/python -m bench.run $(ARGS)

soak: $(STAMP)  ## a million no-op jobs with the purge running: does the throughput hold? (ARGS="--soak-jobs 200000")
	$(BIN)/python -m bench.run --only soak $(ARGS)

chaos: $(STAMP)  ## 20,000 e-mails through SIGKILLed workers and a PostgreSQL restart: nothing lost, nothing twice
	$(BIN)/python -m bench.chaos $(ARGS)

failover: $(STAMP)  ## e-mails and notes while the primary crashes and its synchronous standby is promoted: nothing acknowledged lost, nothing twice
	$(BIN)/python -m bench.failover $(ARGS)

upstream: $(STAMP)  ## Procrastinate's own integration + acceptance tests on our engine (ARGS="--stock", or tests/...)
	$(BIN)/python scripts/upstream_suite.py $(ARGS)

image: $(STAMP)  ## the image with podman, on a base debootstrapped here (no Docker engine, no registry; as root)
	$(BIN)/python scripts/image.py build

image-smoke: $(STAMP)  ## build it, start compose's services from it, smoke-test through the web's port, remove everything
	$(BIN)/python scripts/image.py smoke $(ARGS)

lint: $(STAMP)  ## ruff, the layering of the apps (import-linter), and every relative link and #anchor of the docs
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python scripts/check_links.py

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

db: $(STAMP)  ## start the embedded PostgreSQL and print its DATABASE_URL
	@$(BIN)/python scripts/dev.py db

stopdb: $(STAMP)
	@$(BIN)/python scripts/dev.py stopdb

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
