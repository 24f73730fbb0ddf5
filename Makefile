PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test redteam install lint clean mutate gpu-dry-run-device

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[train,dev,serve,quant,datasets]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/surgery-edge demo --run runs/demo

# two workers (pytest-xdist), each test file on one worker so its module fixtures are built once
TEST_WORKERS ?= 2

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# the red-team table's cases only (tests/redteam.py: each hostile input, its answer, its tests)
redteam: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m redteam tests

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

# The GPU run's dry run under the GPU machine's package versions (torch 2.11, triton 3.6, ...:
# benchmarks/gpu/device-requirements.txt) in .venv-device (ignored by git, several GB), with
# the project installed the way benchmarks/gpu/run.sh installs it there (the wheels of
# benchmarks/gpu/wheels.txt, downloaded into .whl/ as for the real run). Not part of `make test`.
DEVICE_VENV := .venv-device
WHEEL_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64 manylinux1_x86_64

$(DEVICE_VENV)/.installed: benchmarks/gpu/device-requirements.txt
	test -x $(DEVICE_VENV)/bin/python || python3.12 -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/python -m pip install -q -r benchmarks/gpu/device-requirements.txt
	touch $@

gpu-dry-run-device: $(DEVICE_VENV)/.installed
	$(DEVICE_VENV)/bin/python -m pip download -q --no-deps --only-binary=:all: \
		--python-version 3.12 --implementation cp $(addprefix --platform ,$(WHEEL_PLATFORMS)) \
		-d .whl -r benchmarks/gpu/wheels.txt
	PYTHON=$(CURDIR)/$(DEVICE_VENV)/bin/python SURGERY_EDGE_SITE=$(CURDIR)/$(DEVICE_VENV)/site \
		bash benchmarks/gpu/run.sh --dry-run --install
