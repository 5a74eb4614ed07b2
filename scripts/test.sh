#!/usr/bin/env bash
# The test suite, once per Keras backend, each backend in its own processes.
# Usage: bash scripts/test.sh [pytest args...]
#   KLR_BACKENDS="jax tensorflow torch"  the backends (default: all three)
#   KLR_JOBS=N  test processes run at the same time (default: 2 on a machine
#               with 2 or more cores, else 1). A test process keeps about one
#               core busy.
# Without pytest args, each backend's suite runs as shards (the contract,
# the quantized bases, everything else, and on jax the keras.distribution
# child process), longest first (ORDER below): the shards keep both cores
# busy to the end, and a short-lived process does not slow down the way one
# process running every test does (measured: Keras int8 steps 3x slower late
# in a single long run). With pytest args, one process
# per backend runs them. Each output line is prefixed with backend/shard.
# Tests marked `one_backend` (backend-neutral child processes and whole
# examples, e.g. the Flower simulation) run in the torch shards only; the
# logic they drive is tested in-process on every backend.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# The tests compile hundreds of tiny train steps and run each a few times:
# there XLA's LLVM optimizations (JAX's jit) cost more time than they save.
# Numerics are unchanged (no fast-math either way); a value of your own wins.
export XLA_FLAGS="${XLA_FLAGS:---xla_backend_optimization_level=0}"
# JAX compiles every eager op once per shape (10-30 ms each, thousands of
# them per process): its persistent compilation cache lets the jax
# processes share them (and a second run reuse them). It lives in the venv.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$VENV/jax-cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}"
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="${JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES:--1}"
BACKENDS="${KLR_BACKENDS:-jax tensorflow torch}"
CORES="$(nproc 2>/dev/null || echo 1)"
JOBS="${KLR_JOBS:-$(( CORES >= 2 ? 2 : 1 ))}"
STATUS="$(mktemp -d)"
trap 'rm -rf "$STATUS"' EXIT
start=$(date +%s)

# shard -> pytest arguments (the contract shard also runs every method per
# example: test_serving.py, a registry-wide suite). keras.distribution runs on JAX: its test (a JAX
# child process with 8 simulated devices) is a shard of its own, jax only.
shard_args() {
  case "$1" in
    contract) echo "tests/test_contract.py tests/test_serving.py" ;;
    quantized) echo "tests/test_quantized.py" ;;
    distribution) echo "tests/test_distribution.py" ;;
    rest) echo "tests --ignore=tests/test_contract.py --ignore=tests/test_serving.py --ignore=tests/test_quantized.py --ignore=tests/test_distribution.py" ;;
  esac
}
# Longest first (measured on a 2-core machine, clean clone, with issue 28's
# methods: jax/rest 578 s, tensorflow/rest 442, torch/rest 409 (it holds the
# backend-neutral child processes and examples), tensorflow/contract 264,
# jax/quantized 194, tensorflow/quantized 177, jax/contract 170,
# torch/contract 98, torch/quantized 53; jax/distribution took 141 s with
# 12 method families and runs 21 now), so that the two cores finish
# together.
ORDER="jax:rest torch:rest tensorflow:rest tensorflow:contract jax:distribution jax:quantized
       tensorflow:quantized jax:contract torch:contract torch:quantized"

run_job() {
  local backend="$1" tag="$2"
  shift 2
  local t0
  t0=$(date +%s)
  {
    if KERAS_BACKEND="$backend" python -m pytest -p no:cacheprovider --durations=8 "$@" 2>&1; then
      echo 0 >"$STATUS/$backend.$tag"
    else
      echo 1 >"$STATUS/$backend.$tag"
    fi
    echo "=== $backend/$tag took $(( $(date +%s) - t0 )) s ==="
  } | sed -u "s|^|[$backend/$tag] |"
}

active=0
launch() {
  if [ "$active" -ge "$JOBS" ]; then
    wait -n || true
    active=$(( active - 1 ))
  fi
  run_job "$@" &
  active=$(( active + 1 ))
}

if [ "$#" -eq 0 ]; then
  expected_jobs=0
  for job in $ORDER; do
    backend="${job%%:*}"
    shard="${job##*:}"
    case " $BACKENDS " in *" $backend "*) ;; *) continue ;; esac
    expected_jobs=$(( expected_jobs + 1 ))
    # backend-neutral child processes and whole examples: once, with torch
    # shellcheck disable=SC2046
    if [ "$backend" != torch ]; then
      launch "$backend" "$shard" $(shard_args "$shard") -m "not one_backend"
    else
      launch "$backend" "$shard" $(shard_args "$shard")
    fi
  done
else
  for backend in $BACKENDS; do
    launch "$backend" all "$@"
  done
fi
wait

failed=""
for f in "$STATUS"/*; do
  [ "$(cat "$f")" = 0 ] || failed="$failed $(basename "$f")"
done
if [ "$#" -ne 0 ]; then
  expected_jobs=$(echo $BACKENDS | wc -w)
fi
count=$(ls "$STATUS" | wc -l)
[ "$count" -eq "$expected_jobs" ] || failed="$failed (missing results)"
echo "=== all backends took $(( $(date +%s) - start )) s ($JOBS at a time) ==="
if [ -n "$failed" ]; then
  echo "FAILED:$failed"
  exit 1
fi
