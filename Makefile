# fedtiny: every target creates .venv itself when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-8)

.PHONY: install demo test bench deploy-demo clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)  ## install fedtiny and its dev extras into .venv

demo: $(STAMP)  ## run the quickstart scenario
	$(BIN)/fedtiny run scenarios/quickstart.toml

test: $(STAMP)  ## run the test suite
	$(BIN)/python -m pytest -q

bench: $(STAMP)  ## benchmarks (ratios against an in-process baseline)
	$(BIN)/fedtiny bench sim --json

deploy-demo: $(STAMP)  ## SuperLink + 2 SuperNodes (one bridged to a device emulator), 2 rounds, then stop; TLS=1: with TLS and SuperNode auth
	TLS=$(TLS) ./scripts/deploy_demo.sh

clean:
	rm -rf $(VENV) runs .pytest_cache build *.egg-info
