# Two entry points: `make run` (the main job) and `make test`. Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?=
OUTPUT ?= outputs/aft-bytes-lm

.PHONY: run test install clean

install: $(STAMP)

# torch==2.13.0 first: that pin resolves to the CPU build on this disk; an unpinned torch would pull CUDA.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) scripts/main_job.py --output_dir $(OUTPUT) $(if $(DATA),--data $(DATA),)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) outputs
