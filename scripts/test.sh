#!/usr/bin/env bash
# The test suite, once per Keras backend, each in its own process.
# Usage: bash scripts/test.sh [pytest args...]
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
BACKENDS="${KLR_BACKENDS:-jax tensorflow torch}"
failed=""
start=$(date +%s)
for backend in $BACKENDS; do
  echo "=== KERAS_BACKEND=$backend ==="
  t0=$(date +%s)
  if ! KERAS_BACKEND="$backend" python -m pytest -p no:cacheprovider "$@"; then
    failed="$failed $backend"
  fi
  echo "=== $backend took $(( $(date +%s) - t0 )) s ==="
done
echo "=== all backends took $(( $(date +%s) - start )) s ==="
if [ -n "$failed" ]; then
  echo "FAILED backends:$failed"
  exit 1
fi
