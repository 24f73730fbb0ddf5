PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,serve,quant,datasets]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/surgery-edge demo --out runs/demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check surgery_edge kernels cli tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
