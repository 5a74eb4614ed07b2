#!/usr/bin/env bash
# The test suite, once per Keras backend, each backend in its own processes.
# Usage: bash scripts/test.sh [pytest args...]
#   KLR_BACKENDS="jax tensorflow torch"  the backends (default: all three)
#   KLR_JOBS=N  test processes run at the same time (default: 2 on a machine
#               with 2 or more cores, else 1). A test process keeps about one
#               core busy.
# Without pytest args, each backend's suite runs as three shards (the
# contract, the quantized bases, everything else), longest first: the shards
# keep both cores busy to the end, and a short-lived process does not slow
# down the way one process running every test does (measured: Keras int8
# steps 3x slower late in a single long run). With pytest args, one process
# per backend runs them. Each output line is prefixed with backend/shard.
# Tests marked `one_backend` (backend-neutral child processes and whole
# examples, e.g. the Flower simulation) run in the torch shards only; the
# logic they drive is tested in-process on every backend.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
BACKENDS="${KLR_BACKENDS:-jax tensorflow torch}"
CORES="$(nproc 2>/dev/null || echo 1)"
JOBS="${KLR_JOBS:-$(( CORES >= 2 ? 2 : 1 ))}"
STATUS="$(mktemp -d)"
trap 'rm -rf "$STATUS"' EXIT
start=$(date +%s)

SHARD_NAMES=(contract quantized rest)
SHARD_ARGS=("tests/test_contract.py" "tests/test_quantized.py"
            "tests --ignore=tests/test_contract.py --ignore=tests/test_quantized.py")

run_job() {
  local backend="$1" tag="$2"
  shift 2
  local t0
  t0=$(date +%s)
  {
    if KERAS_BACKEND="$backend" python -m pytest -p no:cacheprovider "$@" 2>&1; then
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
  # longest first: every backend's contract, then quantized, then the rest
  for i in 0 1 2; do
    for backend in $BACKENDS; do
      extra=""
      # keras.distribution runs on JAX: its test (a JAX child process) runs once
      if [ "$i" = 2 ] && [ "$backend" != jax ]; then
        extra="--ignore=tests/test_distribution.py"
      fi
      # backend-neutral child processes and whole examples: once, with torch
      if [ "$backend" != torch ]; then
        launch "$backend" "${SHARD_NAMES[$i]}" ${SHARD_ARGS[$i]} $extra -m "not one_backend"
        continue
      fi
      # shellcheck disable=SC2086
      launch "$backend" "${SHARD_NAMES[$i]}" ${SHARD_ARGS[$i]} $extra
    done
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
expected=$(( $# == 0 ? 3 : 1 ))
count=$(ls "$STATUS" | wc -l)
[ "$count" -eq $(( expected * $(echo $BACKENDS | wc -w) )) ] || failed="$failed (missing results)"
echo "=== all backends took $(( $(date +%s) - start )) s ($JOBS at a time) ==="
if [ -n "$failed" ]; then
  echo "FAILED:$failed"
  exit 1
fi
