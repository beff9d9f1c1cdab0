# Two commands on a fresh machine: `make demo` and `make test`.
# Each builds .venv in the checkout (torch CPU wheel first, then the project
# with its pins) and keeps Prefect and MLflow state under .state/.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STATE := $(CURDIR)/.state

export PREFECT_HOME := $(STATE)/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 60
export DO_NOT_TRACK := true
export MLFLOW_TRACKING_URI ?= sqlite:///$(STATE)/mlflow/mlflow.db
export XBT_STATE_DIR := $(STATE)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install browser demo test bench zoo zoo-worlds servers clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	mkdir -p $(STATE)/mlflow
	$(BIN)/xbt demo --out out/demo

# The search page's test drives a real headless chromium; as root with apt-get, install it where it is missing.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; } || \
	  echo "no chromium: the search page's browser test will be skipped (apt-get install -y chromium)"

test: $(STAMP) browser
	mkdir -p $(STATE)/mlflow
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# Rebuild the committed demo zoo (old, mid, new) from its seed.
zoo: $(STAMP)
	$(BIN)/python scripts/build_zoo.py --out zoo --seed 0

# Rebuild the held-out worlds' zoos (old, new; same text) from their seed.
zoo-worlds: $(STAMP)
	$(BIN)/python scripts/build_zoo.py --world glyphs --out zoo/glyphs --seed 0
	$(BIN)/python scripts/build_zoo.py --world textures --out zoo/textures --seed 0
	$(BIN)/python scripts/build_zoo.py --world scenes --out zoo/scenes --seed 0

# Prefect and MLflow servers on loopback (docs/deployment.md); make servers PREFECT_PORT=4201 MLFLOW_PORT=5001
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
servers: $(STAMP)
	$(BIN)/python -m flows.servers --prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT)

clean:
	rm -rf $(VENV) $(STATE) out
