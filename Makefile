PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean mutate

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,serve,quant,datasets]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/surgery-edge demo --out runs/demo

# two workers (pytest-xdist), each test file on one worker so its module fixtures are built once
TEST_WORKERS ?= 2

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# mutation testing (mutmut; the modules and test files: [tool.mutmut] in pyproject.toml), niced
# on a shared machine; the summary per module goes to benchmarks/results/cpu/mutation.{json,md}
MUTATE_WORKERS ?= 1

mutate: $(STAMP)
	SURGERY_EDGE_MUTATING=1 TRITON_INTERPRET=1 nice -n 10 $(BIN)/python -m mutmut run --max-children $(MUTATE_WORKERS)
	$(BIN)/python benchmarks/mutation_summary.py --out benchmarks/results/cpu \
		--ran "make mutate MUTATE_WORKERS=$(MUTATE_WORKERS)"

lint: $(STAMP)
	$(BIN)/ruff check surgery_edge kernels cli tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
