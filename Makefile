# Two commands do everything on a fresh machine (see README "Quickstart"):
#   make figures   set up .venv and make every figure and table into figures/ (re-plotted from the
#                  committed caches in figures/data/runs; a missing or damaged cache is recomputed)
#   make test      set up .venv and run the tests
#   make notebooks execute the notebooks in place at the default preset (they are committed executed)
#   make browser   install Debian's chromium and chromium-driver (root, apt-get) and run the browser test alone
# The set-up pins the CPU build of torch (TORCH=...) and the matplotlib that rendered the committed figures
# (MATPLOTLIB=..., golore_lab.plotting.RENDERED_WITH: other versions draw other bytes); the package itself only
# asks for ranges.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
MATPLOTLIB ?= matplotlib==3.11.2

.PHONY: setup figures notebooks test browser bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml environment.yml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" "$(MATPLOTLIB)"
	$(PY) -m pip install -q -e ".[all]"
	touch $@

figures: setup
	$(PY) -m golore_lab figures

notebooks: setup
	$(PY) -m golore_lab notebooks

test: setup
	$(PY) -m pytest -q

browser: setup
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)
	$(PY) -m pytest -q -m browser

bench: setup
	$(PY) bench/optimizer_step.py
	$(PY) bench/counterexample.py

clean:
	rm -rf $(VENV) .pytest_cache
