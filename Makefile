# Two commands on a fresh machine:  make demo  (install + run the demo)  and  make test.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test report

$(VENV)/.installed: pyproject.toml testbed/pyproject.toml benchmarks/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pin torch first: a bare torch requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# The library, its testbed (the default model) and the benchmarks: three packages of this repository.
	$(PY) -m pip install -q -e '.[test]' -e ./testbed -e ./benchmarks
	# The CLIP BPE vocabulary ships in this wheel; its torchvision dependency is not wanted.
	$(PY) -m pip install -q --no-deps clip-anytorch==2.6.0
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/memfree demo

test: install
	$(PY) -m pytest -q

report: install
	$(VENV)/bin/memfree testbed report --json testbed-report.json
