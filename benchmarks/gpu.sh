#!/usr/bin/env bash
# GPU figures on a machine with an NVIDIA GPU (CUDA 12 driver):
#   bash benchmarks/gpu.sh            # installs into .venv-gpu, runs, writes docs/benchmarks_gpu.md
#   SMALL=1 bash benchmarks/gpu.sh    # a tiny shape: checks the script in a minute
# LoRA and QLoRA train steps at a Gemma-2B shape (random weights, bfloat16)
# on the jax and torch backends, and PEFT (+ bitsandbytes QLoRA) on the same
# GPU; see benchmarks/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || {
  echo "gpu.sh: no NVIDIA GPU here (nvidia-smi failed)" >&2; exit 1; }
VENV=${VENV:-.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -e . "jax[cuda12]" torch keras-hub transformers peft bitsandbytes
python - <<'PY'
import jax, torch
print("jax devices:", jax.devices())
print("torch cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
ARGS=(--all --markdown docs/benchmarks_gpu.md --json-out benchmarks_gpu.json)
if [ "${SMALL:-0}" = 1 ]; then ARGS+=(--small --steps 3 --warmup 1); fi
# JAX would otherwise take 75% of the GPU up front; torch runs next in its own process.
XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/gpu.py "${ARGS[@]}"
echo "wrote docs/benchmarks_gpu.md"
