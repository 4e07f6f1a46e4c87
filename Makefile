# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-gmm test bench gpu-check clean

# CPU machines: install the local CPU torch wheel first so no multi-GB CUDA build is pulled.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) scripts/demo_controlnet.py

demo-gmm: install
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest

# GPU suite: fp16 / bf16 sampling vs the CPU fp32 result, training in bf16 with gradient checkpointing (compile on
# and off), FSDP with one process, SD1.5-size throughput vs diffusers. Skips (passes) on machines without CUDA.
gpu-check: install
	$(PY) -m pytest -m gpu tests/gpu -rs
	if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) benchmarks/full_size.py --device cuda --quick; \
	else echo "gpu-check: no CUDA GPU, benchmarks/full_size.py --device cuda skipped"; fi

bench: install
	$(PY) benchmarks/gmm_samplers.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
