# Two commands for a fresh machine: `make demo` and `make test`. Both are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NPROC ?= 2

.PHONY: demo test bench setup clean

setup: $(STAMP)

# torch is pinned here: an unpinned torch pulls a multi-GB CUDA build; pyproject allows >=2.4
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/shardwise run --nproc-per-node $(NPROC) examples/gpt/train.py --config examples/gpt/ds_zero2.json
	$(VENV)/bin/shardwise report runs/gpt_zero2

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	# DeepSpeed rows: torch stays pinned in the same command (peers.md). compare.py first builds DeepSpeed's
	# CPU ops (first run only, 2-8 min, announced), calibrates each system, then runs the timed rounds with
	# progress lines; a failed round is reported and skipped, and it exits non-zero only if nothing was measured
	$(PY) -m pip install --quiet torch==2.13.0 matplotlib deepspeed==0.19.8
	$(PY) benchmarks/compare.py --out benchmarks/results.json
	$(PY) benchmarks/plot.py --json benchmarks/results.json --out benchmarks/results.png

clean:
	rm -rf $(VENV) runs .pytest_cache
