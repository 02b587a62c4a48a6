# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench clean fashion

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gradzip demo --out results/demo

# Fashion-MNIST (Debian's dataset-fashion-mnist) for the tests that train on it; where apt
# cannot install it (not root, no network) those tests are skipped and say why.
FASHION := /usr/share/datasets/fashion-mnist

fashion:
	@test -d $(FASHION) || { timeout 300 sh -c 'apt-get update -qq && \
	  apt-get install -y -qq dataset-fashion-mnist' >/dev/null 2>&1 || \
	  echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped"; }

test: $(STAMP) fashion
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(BIN)/gradzip bench

clean:
	rm -rf $(VENV) results build src/*.egg-info
