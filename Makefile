# The project's two commands: `make pretrain` (set up, then the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: setup test pretrain bench clean

# The venv is rebuilt whenever pyproject.toml changes. On machines without an NVIDIA GPU the
# pinned CPU wheel of torch goes in first, so the plain `torch` requirement installs nothing more
# (otherwise pip would pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	if command -v nvidia-smi >/dev/null 2>&1; then \
	    $(PIP) install --quiet "torch>=2.3"; \
	else \
	    $(PIP) install --quiet "torch==$(TORCH_VERSION)" || \
	    $(PIP) install --quiet "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PIP) install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs build *.egg-info
