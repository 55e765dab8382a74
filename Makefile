# Two entry points: `make demo` (set up, then run the investigations on the shipped organisms)
# and `make test` (set up, then run the test suite). Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.interp-installed

.PHONY: demo test setup lint browser test-tl4

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is a CPU build on this machine's disk; an unpinned
	# torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/interp demo

# The report test opens the demo report in headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; the report-rendering test will be skipped"; \
	  else echo "note: install chromium to run the report-rendering test"; fi; }

test: $(STAMP) browser
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check interp probes tests bench

# TransformerLens 4 (HookedTransformer removed): a separate environment, not part of `make test`.
# torch first and pinned (as above); then transformer-lens 4 and the project's other dependencies
# except sae-lens (which pins transformer-lens < 4), read from pyproject.toml; the project itself
# without its pinned dependencies. The SAE tests skip themselves when sae_lens is missing.
TL4_VENV ?= .venv-tl4
TL4_PY := $(TL4_VENV)/bin/python
TL4_STAMP := $(TL4_VENV)/.interp-installed
TL4_DEPS = $(shell python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
  print(' '.join(repr(d) for d in p['dependencies'] + p['optional-dependencies']['dev'] \
  if not d.startswith(('torch', 'transformer-lens', 'sae-lens'))))")

$(TL4_STAMP): pyproject.toml
	test -x $(TL4_PY) || python3 -m venv $(TL4_VENV)
	$(TL4_PY) -m pip install -q --upgrade pip
	$(TL4_PY) -m pip install -q torch==2.13.0
	$(TL4_PY) -m pip install -q 'transformer-lens>=4,<5' $(TL4_DEPS)
	$(TL4_PY) -m pip install -q --no-deps -e .
	touch $(TL4_STAMP)

test-tl4: $(TL4_STAMP)
	$(TL4_PY) -c "import importlib.metadata as m; print('transformer-lens', m.version('transformer-lens'))"
	$(TL4_PY) -m pytest -q -m "not sae" $(TL4_ARGS)
