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
	$(PY) -m pytest -q -n 2 tests

lint: install
	$(PY) -m ruff check .

data: $(DATA)/.complete

$(DATA)/.complete: $(VENV)/.installed common/synthetic.py
	$(PY) -m common.synthetic $(DATA)
	touch $@

$(addprefix demo-,$(PAPERS)): demo-%: install data
	PY=$(PY) DATA=$(DATA) OUT=outputs/demo/$* bash demos/$*.sh

# The domain-adaptation demos start every row from one initial model, trained once on the synthetic GTA5
# (demos/uda_init.sh) and remade only when the data or that script change.
INIT := outputs/demo/init
.PHONY: demo-init
demo-init: $(INIT)/data.sha256
$(INIT)/data.sha256: $(VENV)/.installed $(DATA)/.complete demos/uda_init.sh
	PY=$(PY) DATA=$(DATA) OUT=$(INIT) bash demos/uda_init.sh
demo-adaptsegnet demo-advent demo-proda: demo-init

# Every demo, then one table of all of them: printed and written to outputs/demo/table.md (no tracked file changes).
demo: install data
	@for p in $(DEMOS); do $(MAKE) --no-print-directory demo-$$p || exit 1; done
	$(PY) -m common.demo table outputs/demo --out outputs/demo/table.md

# Maintainers, after `make demo` (and `make bench`): copy the demo table and figures from outputs/demo/ and the
# benchmark table from outputs/bench/ into docs/demos.md, docs/img/, docs/bench.md and README.md's generated blocks.
readme: install
	$(PY) -m common.demo readme

# Speed of every paper's training step and inference, float32 and --amp: outputs/bench/{table.md,bench.json}.
# `make bench DEVICE=cuda` on a GPU; BENCH_ARGS="--only detr,pvt --threads 2" for a subset (docs/performance.md).
DEVICE ?= cpu
.PHONY: bench
bench: install
	$(PY) -m benchmarks.bench --device $(DEVICE) --out outputs/bench $(BENCH_ARGS)

clean:
	rm -rf outputs $(DATA)
