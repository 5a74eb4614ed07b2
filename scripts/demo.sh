#!/usr/bin/env bash
# Main job: adapt a tiny KerasHub Gemma (built locally) from task A to task B.
# Usage: bash scripts/demo.sh [--backend jax|tensorflow|torch] [--method lora] [--rank 8] ...
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec keras-lowrank demo "$@"
