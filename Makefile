# Two commands do everything on a fresh clone: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA := data/synthetic
PAPERS := detr pvt vistr trackformer adaptsegnet advent proda
# Only the papers whose script and demo exist.
DEMOS := $(foreach p,$(PAPERS),$(if $(and $(wildcard $(p).py),$(wildcard demos/$(p).sh)),$(p)))

.PHONY: install test lint data demo readme $(addprefix demo-,$(PAPERS)) clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: install
	$(PY) -m pytest -q tests

lint: install
	$(PY) -m ruff check .

data: $(DATA)/.complete

$(DATA)/.complete: $(VENV)/.installed common/synthetic.py
	$(PY) -m common.synthetic $(DATA)
	touch $@

$(addprefix demo-,$(PAPERS)): demo-%: install data
	PY=$(PY) DATA=$(DATA) OUT=outputs/demo/$* bash demos/$*.sh

demo: install data
	@for p in $(DEMOS); do $(MAKE) --no-print-directory demo-$$p || exit 1; done
	$(PY) -m common.demo table outputs/demo --out outputs/demo/table.md

# Maintainers: copy the demos' table (and figures) from outputs/demo/ into README.md and docs/.
readme: install
	$(PY) -m common.demo table outputs/demo --out outputs/demo/table.md --readme README.md

# Speed of every paper's training step and inference, float32 and --amp: outputs/bench/{table.md,bench.json}.
# `make bench DEVICE=cuda` on a GPU; BENCH_ARGS="--only detr,pvt --threads 2" for a subset (docs/performance.md).
DEVICE ?= cpu
.PHONY: bench
bench: install
	$(PY) -m benchmarks.bench --device $(DEVICE) --out outputs/bench $(BENCH_ARGS)

clean:
	rm -rf outputs $(DATA)
