#!/usr/bin/env bash
# Train on this machine: one process driving all of its accelerators (or its CPU).
#
# usage: launch/local.sh CONFIG[:VARIANT] WORKDIR [--config.a.b=VALUE ...]
#   e.g. launch/local.sh configs/toy_regression.py /tmp/toy --config.train.num_steps=50
#   (or toy_regression: a config shipped with the package, by name, from any directory)
# Running it again with the same WORKDIR resumes from the latest checkpoint.
# Environment: PYTHON (default: python3).
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,7p' "$0" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2

# A single process: never wait for other processes, whatever the environment says.
export VISCOIN_DISTRIBUTED=0
exec "${PYTHON:-python3}" -m viscoin_jax.cli train --config "$config" --workdir "$workdir" "$@"
