# Sourced by the set-up scripts: create (once) and activate ./.venv with
# everything keras-lowrank, its tests and its demo need, on all three backends.
#
# torch: the CPU build is used (TORCH_SPEC, default torch==2.13.0, which is a
# local CPU wheel on our build machines); set TORCH_SPEC to what your platform
# needs, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".
#
# TensorFlow: only the CPU build (tensorflow-cpu). KerasHub asks for
# tensorflow-text, which asks for the full `tensorflow` build: installing it
# would put a second, CUDA-enabled TensorFlow (1.9 GB) into the venv, which
# prints CUDA log lines whenever anything imports TensorFlow (Keras does, on
# every backend, to serialize a model). keras-hub is therefore installed
# with its other requirements but without tensorflow-text, which only its
# tokenizers use and keras-lowrank never needs.
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
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning}"
# pip, with its output in $VENV/setup.log (shown if pip fails).
pip_q() {
  if ! python -m pip install -q "$@" >>"$VENV/setup.log" 2>&1; then
    grep -v "is ignored: it is neither" "$VENV/setup.log" | tail -n 40 >&2
    echo "[setup] pip failed; the full log is $VENV/setup.log" >&2
    return 1
  fi
}
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing keras-lowrank and its backends into $VENV (one time; log: $VENV/setup.log)" >&2
  : >"$VENV/setup.log"
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # An older set-up installed the full tensorflow beside tensorflow-cpu; they
  # share files, so both go and tensorflow-cpu comes back alone.
  if python -m pip show -q tensorflow >/dev/null 2>&1; then
    python -m pip uninstall -q -y tensorflow tensorflow-cpu tensorflow-text >>"$VENV/setup.log" 2>&1 || true
  fi
  # shellcheck disable=SC2086
  pip_q $TORCH_SPEC
  pip_q --no-deps keras-hub
  # keras-hub's requirements but tensorflow-text (pip would otherwise add
  # them back through keras-hub: keras-hub is not named again below; pip
  # then notes in the log that tensorflow-text is missing, which is meant)
  hub_requires="$(python -c 'from importlib.metadata import requires
print(" ".join(r.split(";")[0].replace(" ", "") for r in requires("keras-hub")
               if "tensorflow-text" not in r and "extra ==" not in r))')"
  # keras-lowrank with its [files] and [federated] extras (Flower with its
  # Ray simulation engine, dp-accounting), and its [test] extra but keras-hub
  # (peft runs in PyTorch as the reference of the parity tests)
  # shellcheck disable=SC2086
  pip_q "jax[cpu]" tensorflow-cpu $TORCH_SPEC -e ".[files,federated]" $hub_requires \
    pytest h5py peft matplotlib "bitsandbytes; platform_system != 'Darwin'" \
    "mkdocs-material>=9" "mkdocstrings[python]>=0.24"
  python -c "import keras, keras_hub, jax, torch, tensorflow, safetensors, matplotlib, flwr, ray, dp_accounting, mkdocs, mkdocstrings" \
    || { echo "[setup] the installation is incomplete; see $VENV/setup.log" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
