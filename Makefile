# Two commands do all set-up on a fresh machine with Python 3.11:
#   make demo   a local swarm: origin, supernode, 4 dfpeers, one 256 MiB file
#   make test   the whole test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dragonfly.demo

# as root, first installs the Debian packages of the real-component tiers
# (scripts/install-deps.sh, as .ci/run does); otherwise it ends by naming each
# tier that was skipped and the command that installs what it needs; the
# linters run first (ruff: pyproject.toml; mypy: setup.cfg, strict on the core,
# protocol, scheduler, picker and simulator)
test: $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then scripts/install-deps.sh; fi
	$(BIN)/ruff check dragonfly tests bench twisted
	$(BIN)/mypy
	@status=0; $(BIN)/python -m pytest -q || status=$$?; scripts/install-deps.sh --check; exit $$status

# the data-path benchmark (1 GiB on loopback: nginx, curl, Dragonfly, aria2c),
# then the swarm benchmark on emulated hosts (network namespaces + tc; needs root)
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[bench]' --config-settings editable_mode=compat
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.datapath
	$(BIN)/python -m bench.swarm

clean:
	rm -rf $(VENV) build *.egg-info
