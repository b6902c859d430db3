# The two commands: `make demo` and `make test`. Both build the environment from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test unit e2e lock clean

$(STAMP): requirements/cpu.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps -r requirements/cpu.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m gateway demo

test: $(STAMP)
	$(PY) -m pytest -q

unit: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

e2e: $(STAMP)
	$(PY) -m pytest -q -m e2e

# Refresh the pins from the current environment (after a deliberate upgrade).
lock:
	head -3 requirements/cpu.lock > requirements/cpu.lock.new
	$(PY) -m pip freeze --all --exclude-editable | grep -v -iE '^(pip|wheel|torchvision|torchaudio|torchcodec)[=@ ]' | grep -v '^#' >> requirements/cpu.lock.new
	mv requirements/cpu.lock.new requirements/cpu.lock

clean:
	rm -rf $(VENV)
