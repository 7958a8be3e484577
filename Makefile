# Two commands on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench browser clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,hf,open_clip,video]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/hooked-vit demo --out demo_out

# Headless Chromium for tests/test_report_browser.py (skipped without it); Debian / Ubuntu, as root.
browser:
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq chromium; }

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/forward.py
	$(PY) benchmarks/identify.py

clean:
	rm -rf demo_out .pytest_cache
