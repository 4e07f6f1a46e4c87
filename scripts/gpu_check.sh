#!/usr/bin/env bash
# The GPU check suite on a machine with CUDA and no network (the lent device machine), with its own python3 (torch
# with CUDA): carried wheels from scripts/gpu_wheels.sh are installed into /tmp/site, the repo is used in place
# (PYTHONPATH, no venv, no pip install of the project). Logs and figures go to $OUT (default outputs/gpu_check).
#   bash scripts/gpu_check.sh            # pytest -m gpu tests/gpu, then benchmarks/full_size.py --device cuda --quick
# On a machine with network and a CUDA torch in .venv, `make gpu-check` runs the same two commands.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
$PY - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, diffusers, accelerate, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print("diffusers", diffusers.__version__, "accelerate", accelerate.__version__, "transformers", transformers.__version__)
PY
$PY -m pytest -m gpu tests/gpu -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}
if ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: no CUDA GPU, benchmarks/full_size.py --device cuda skipped" | tee "$OUT/full_size.log"
    exit "$rc"
fi
$PY benchmarks/full_size.py --device cuda --quick 2>&1 | tee "$OUT/full_size.log"
exit $(( rc || PIPESTATUS[0] ))
