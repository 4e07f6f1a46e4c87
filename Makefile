# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-gmm test bench clean

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

bench: install
	$(PY) benchmarks/gmm_samplers.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
