# fedtiny: every target creates .venv itself when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-8)

.PHONY: install native demo test bench deploy-demo clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP) native  ## install fedtiny and its dev extras into .venv, build the host kernels

# The simulator's int8 host kernels (same integers as the PyTorch fallback, several times faster).
native:
	@if command -v $${CC:-cc} >/dev/null 2>&1; then $(MAKE) -s -C device/c; \
	else echo "make: no C compiler (cc): the int8 steps run on the PyTorch kernels, same results, slower"; fi

demo: $(STAMP) native  ## run the quickstart scenario
	$(BIN)/fedtiny run scenarios/quickstart.toml

test: $(STAMP) native  ## run the test suite
	$(BIN)/python -m pytest -q

bench: $(STAMP) native  ## benchmarks (ratios against an in-process baseline)
	$(BIN)/fedtiny bench sim --json

deploy-demo: $(STAMP) native  ## SuperLink + 2 SuperNodes (one bridged to a device emulator), 2 rounds, then stop; TLS=1: with TLS and SuperNode auth
	TLS=$(TLS) ./scripts/deploy_demo.sh

clean:
	rm -rf $(VENV) runs .pytest_cache build *.egg-info
	$(MAKE) -s -C device/c clean
