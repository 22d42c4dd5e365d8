# agentpay: every target installs what it needs first, so a fresh clone runs `make demo` / `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PEERS  := .venv-peers
MCP_PEERS := .venv-mcp-peers
NODE_PEERS := tests/peers/node
STAMP_PY    := $(VENV)/.installed
STAMP_NODE  := node_modules/.installed
STAMP_PEERS := $(PEERS)/.installed
STAMP_MCP_PEERS := $(MCP_PEERS)/.installed
STAMP_NODE_PEERS := $(NODE_PEERS)/node_modules/.installed
STAMP_BROWSER := $(VENV)/.browser

.PHONY: setup demo test lint typecheck contracts contracts-check forge-test pytest clean

setup: $(STAMP_PY) $(STAMP_NODE) $(STAMP_PEERS) $(STAMP_MCP_PEERS) $(STAMP_NODE_PEERS) $(STAMP_BROWSER)

# The dashboard test drives a real headless Chromium: Debian's chromium and chromedriver (their recommended
# packages bring the fonts), installed when missing (as root, like CI; otherwise install them yourself).
$(STAMP_BROWSER): $(STAMP_PY)
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }
	touch $@

$(STAMP_PY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(STAMP_NODE): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The official SDKs are test peers. Their top-level package is also named `x402`, so they live in their own venv.
$(STAMP_PEERS): tests/peers/requirements.txt
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q --upgrade pip
	$(PEERS)/bin/pip install -q -r tests/peers/requirements.txt
	touch $@

# The official x402 MCP helpers pin `mcp` 1.x (agentpay runs 2.x): a venv of their own for the MCP interop peer.
$(STAMP_MCP_PEERS): tests/peers/requirements-mcp.txt
	$(PYTHON) -m venv $(MCP_PEERS)
	$(MCP_PEERS)/bin/pip install -q --upgrade pip
	$(MCP_PEERS)/bin/pip install -q -r tests/peers/requirements-mcp.txt
	touch $@

# mppx's MCP client (MPP over MCP) for the MCP interop test: its own package.json and lock, so the project's
# toolchain (anvil, forge, solc-js) stays as pinned.
$(STAMP_NODE_PEERS): $(NODE_PEERS)/package.json $(NODE_PEERS)/package-lock.json
	cd $(NODE_PEERS) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

demo: $(STAMP_PY) $(STAMP_NODE)
	$(BIN)/python -m examples.demo

test: setup
	$(MAKE) lint typecheck contracts-check forge-test pytest

lint: $(STAMP_PY)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP_PY)
	$(BIN)/mypy x402 escrow gateway examples

# Compile contracts/src with solc-js into escrow/artifacts (committed, so pip-only installs run).
contracts: $(STAMP_NODE)
	node contracts/build.mjs

# CI: rebuild the artifacts and fail if they drift from the committed ones.
contracts-check: $(STAMP_NODE)
	node contracts/build.mjs --check

forge-test: $(STAMP_NODE)
	cd contracts && ../node_modules/.bin/forge test --offline

# Parallel workers, one per core (PYTEST_WORKERS=0 runs serially): a worker takes whole test files, so a
# file's module fixtures (its devnets) are built once; tests/conftest.py starts the longest files first.
PYTEST_WORKERS ?= auto
pytest: $(STAMP_PY) $(STAMP_NODE) $(STAMP_PEERS) $(STAMP_MCP_PEERS) $(STAMP_NODE_PEERS) $(STAMP_BROWSER)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV) $(PEERS) $(MCP_PEERS) $(NODE_PEERS)/node_modules node_modules contracts/out contracts/cache .agentpay
