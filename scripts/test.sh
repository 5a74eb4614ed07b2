#!/usr/bin/env bash
# The test suite, once per Keras backend, each in its own process.
# Usage: bash scripts/test.sh [pytest args...]
#   KLR_BACKENDS="jax tensorflow torch"  the backends (default: all three)
#   KLR_JOBS=N  backends run at the same time (default: 2 on a machine with
#               2 or more cores, else 1). A test process keeps about one core
#               busy, so two backends side by side take about half the time.
#               Each output line is prefixed with its backend.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
BACKENDS="${KLR_BACKENDS:-jax tensorflow torch}"
CORES="$(nproc 2>/dev/null || echo 1)"
JOBS="${KLR_JOBS:-$(( CORES >= 2 ? 2 : 1 ))}"
STATUS="$(mktemp -d)"
trap 'rm -rf "$STATUS"' EXIT
start=$(date +%s)

run_backend() {
  local backend="$1"
  shift
  local t0
  t0=$(date +%s)
  {
    if KERAS_BACKEND="$backend" python -m pytest -p no:cacheprovider "$@" 2>&1; then
      echo 0 >"$STATUS/$backend"
    else
      echo 1 >"$STATUS/$backend"
    fi
    echo "=== $backend took $(( $(date +%s) - t0 )) s ==="
  } | sed -u "s/^/[$backend] /"
}

active=0
for backend in $BACKENDS; do
  if [ "$active" -ge "$JOBS" ]; then
    wait -n || true
    active=$(( active - 1 ))
  fi
  run_backend "$backend" "$@" &
  active=$(( active + 1 ))
done
wait

failed=""
for backend in $BACKENDS; do
  [ "$(cat "$STATUS/$backend" 2>/dev/null || echo 1)" = 0 ] || failed="$failed $backend"
done
echo "=== all backends took $(( $(date +%s) - start )) s ($JOBS at a time) ==="
if [ -n "$failed" ]; then
  echo "FAILED backends:$failed"
  exit 1
fi
