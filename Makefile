# Two commands: `make lab` (install, then JupyterLab on notebooks/) and `make test` (install, unit tests, nbval).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# No GPU: take the CPU build of torch, never the multi-GB CUDA one (pip prefers 2.13.0+cpu from the CPU index;
# machines with a local wheel take that). With a GPU: the default CUDA build. Override with TORCH_SPEC=...
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH_SPEC ?= torch>=2.4
TORCH_ARGS ?=
else
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_ARGS ?= --extra-index-url https://download.pytorch.org/whl/cpu
endif
LAB_PORT ?= 8888
# Jupyter refuses to run as root (containers, Colab-like VMs) unless told; only then pass the flag.
LAB_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)
NBVAL_ARGS ?= --nbval-lax --nbval-cell-timeout=600

.PHONY: lab test install-lab install-dev unit nbval bench clean student notebooks-sync test-cpu-variants

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PIP) install --quiet "$(TORCH_SPEC)" $(TORCH_ARGS)
	touch $@

$(VENV)/.lab: pyproject.toml requirements-assets.txt $(VENV)/.torch
	$(PIP) install --quiet -e ".[lab]"
	$(PIP) install --quiet --no-deps -r requirements-assets.txt
	touch $@

$(VENV)/.dev: pyproject.toml requirements-assets.txt $(VENV)/.torch
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps -r requirements-assets.txt
	touch $@

install-lab: $(VENV)/.lab
install-dev: $(VENV)/.dev

lab: $(VENV)/.lab
	@echo "Starting JupyterLab on notebooks/ (headless: open the URL printed below)."
	$(VENV)/bin/jupyter lab --no-browser --ip=127.0.0.1 --port=$(LAB_PORT) --notebook-dir=notebooks $(LAB_ROOT)

test: $(VENV)/.dev
	$(PY) -m pytest --durations=30 tests
	$(MAKE) --no-print-directory test-cpu-variants
	$(PY) -m pytest $(NBVAL_ARGS) --durations=0 notebooks

# The checks that compare two float paths through a quantizer, again under other CPU kernel choices (other float
# reduction orders): they must pass on every machine. smollm2 (~2 min) runs once, under the kernel choice farthest
# from the native one (both ATen and MKL forced down); the tiny models cover every variant.
CPU_VARIANTS := ATEN_CPU_CAPABILITY=default ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
                MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1 OMP_NUM_THREADS=2
CPU_VARIANT_TESTS ?= tests/test_act_quant.py tests/test_triton_backend.py -k "kernel_equals_reference or \
                     layer_is or identity or fused_norm or (tiny_models_agree and llama)"
test-cpu-variants: $(VENV)/.dev
	@set -e; for v in $(CPU_VARIANTS); do echo "== $$v"; env $$v $(PY) -m pytest -q $(CPU_VARIANT_TESTS); done
	env ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=AVX2 $(PY) -m pytest -q tests/test_triton_backend.py -k smollm2

unit: $(VENV)/.dev
	$(PY) -m pytest tests

nbval: $(VENV)/.dev
	$(PY) -m pytest $(NBVAL_ARGS) --durations=0 notebooks

# The student release of every course notebook (nbgrader: solutions -> stubs) in build/student/, and the nbgrader
# course directory for grading in build/course/ (README: "For instructors").
student: $(VENV)/.dev
	$(PY) -m atom_lab.classroom build --out build/student

# Rewrite each notebook's Colab badge and setup cell from pyproject.toml (repository URL, version tag).
notebooks-sync: $(VENV)/.dev
	$(PY) -m atom_lab.classroom sync

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
