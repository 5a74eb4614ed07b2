# Sourced by the set-up scripts: create (once) and activate ./.venv with
# everything keras-lowrank, its tests and its demo need, on all three backends.
#
# torch: the CPU build is used (TORCH_SPEC, default torch==2.13.0, which is a
# local CPU wheel on our build machines); set TORCH_SPEC to what your platform
# needs, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${KLR_VENV:-$ROOT/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
STAMP="$VENV/.klr-installed"
WANT="$(cat pyproject.toml scripts/env.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing keras-lowrank and its backends into $VENV (one time)" >&2
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # shellcheck disable=SC2086
  python -m pip install -q $TORCH_SPEC
  python -m pip install -q "jax[cpu]" "tensorflow-cpu" -e ".[hub,files,test]" $TORCH_SPEC
  echo "$WANT" > "$STAMP"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning}"
