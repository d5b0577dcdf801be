# allscore: `make demo` runs the whole path on embedded defaults; `make test` runs every check CI runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv test lint unit demo bench clean constraints

# The venv is (re)built whenever pyproject.toml or the C decode kernel changes (an editable install compiles
# core/_cellkernel.c into core/ itself).
$(STAMP): pyproject.toml core/_cellkernel.c
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "allscore needs Python 3.11 or newer")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest tests $(PYTEST_ARGS)

unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/allscore demo

bench: venv
	$(PY) -m bench.run

# The versions the Docker images install (constraints.txt), from this venv: run after changing dependencies.
constraints: venv
	@{ echo "# The exact versions the Docker images install (pip's --constraint): a rebuild gets the same ones."; \
	   echo "# Made from a venv with allscore[dev] installed: make constraints (Python 3.11, Linux x86_64)."; \
	   $(PY) -m pip freeze --exclude-editable | grep -v '^-e\|@ file'; \
	   echo "# tensorflow-cpu (the images' build, extra trainer-cpu): the venv's tensorflow version"; \
	   $(PY) -m pip freeze | sed -n 's/^tensorflow==/tensorflow-cpu==/p'; } > constraints.txt

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
