# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv when absent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo report test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/vitspec analyze deit_small --random-init --out runs/demo --overwrite

# The example report: figures and report.html from the trained digits toy runs (experiments/toy_scaling.py)
TOY := reports/toy_scaling
report: $(VENV)/.installed
	$(VENV)/bin/vitspec report $(TOY)/baseline $(TOY)/attnscale $(TOY)/featscale $(TOY)/compare \
		--size column --out $(TOY)/report --overwrite

test: $(VENV)/.installed-test
	$(PY) -m pytest

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check vitspec tests benchmarks experiments scripts
	$(VENV)/bin/ruff format --check vitspec tests benchmarks experiments scripts

bench: $(VENV)/.installed
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
