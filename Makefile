# The project's two commands: `make pretrain` (set up, then the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
RANKS  ?= 2
DATA   ?= runs/data
RUN    ?= runs/tiny
# More `--set key=value` overrides for the main job, space-separated, applied after the recipe's own
# (leave train.output_dir and data.manifest to RUN and DATA). A run resumes only with the model it
# saved, so a changed model takes its own RUN: make pretrain RUN=runs/m512 SET="model.nb_features=512".
SET    ?=

.PHONY: setup test pretrain data clean

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
	$(PIP) install --quiet -e ".[dev,hf]"
	touch $@

setup: $(VENV)/.installed

# Lint and format first: they fail in a second, the suite takes minutes.
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q --durations=25 tests

$(DATA)/train/manifest.json: | setup
	$(VENV)/bin/performer data prepare --source stdlib --out $(DATA)

data: $(DATA)/train/manifest.json

# The main job: tiny encoder-decoder Performer on the stdlib corpus, DeepSpeed on $(RANKS) CPU
# ranks (or GPUs), then export and a sample generation. Resumes if interrupted.
pretrain: data
	$(VENV)/bin/deepspeed --num_gpus $(RANKS) --module launcher.pretrain \
	    --config configs/tiny.yaml --set data.manifest=$(DATA)/train train.output_dir=$(RUN) $(SET) --resume auto
	$(VENV)/bin/performer export --checkpoint $(RUN) --out $(RUN)/export
	$(VENV)/bin/performer generate --model $(RUN)/export --max-new-tokens 32 \
	    --prompt "$$(printf 'def read_config(path):\n    with open(<extra_id_0>) as handle:\n        return <extra_id_1>(handle)')"

clean:
	rm -rf $(VENV) runs build *.egg-info
