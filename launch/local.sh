#!/usr/bin/env bash
# Train on this machine: one process driving all of its accelerators (or its CPU).
#
# usage: launch/local.sh [--processes N] CONFIG[:VARIANT] WORKDIR [--config.a.b=VALUE ...]
#   e.g. launch/local.sh configs/toy_regression.py /tmp/toy --config.train.num_steps=50
#   (or toy_regression: a config shipped with the package, by name, from any directory)
# Running it again with the same WORKDIR resumes from the latest checkpoint.
# --processes N: N local processes of one multi-process run (JAX_COORDINATOR_ADDRESS on a free
#   port, JAX_NUM_PROCESSES, JAX_PROCESS_ID), to try multi-host on one machine; on CPU give each
#   several devices with XLA_FLAGS=--xla_force_host_platform_device_count=4.
# Environment: PYTHON (default: python3).
set -euo pipefail

processes=1
if [ "${1:-}" = "--processes" ]; then
  processes=${2:-}
  shift 2 || true
fi
if ! [[ "$processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: --processes needs a whole number >= 1, got '${processes}'" >&2
  exit 2
fi
if [ $# -lt 2 ]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
python=${PYTHON:-python3}

if [ "$processes" -eq 1 ]; then
  # A single process: never wait for other processes, whatever the environment says.
  export VISCOIN_DISTRIBUTED=0
  exec "$python" -m viscoin_jax.cli train --config "$config" --workdir "$workdir" "$@"
fi

# N processes on this machine: a coordinator on a free local port, one process id each.
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" JAX_NUM_PROCESSES="$processes"
unset VISCOIN_DISTRIBUTED
pids=()
for ((i = 0; i < processes; i++)); do
  JAX_PROCESS_ID=$i "$python" -m viscoin_jax.cli train --config "$config" --workdir "$workdir" "$@" &
  pids+=($!)
done
# SIGTERM / Ctrl-C reach every process (a preemption notice: each saves and stops at the same step).
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
status=0
for pid in "${pids[@]}"; do
  while :; do  # a trapped signal interrupts `wait`: wait again while the process still runs
    rc=0
    wait "$pid" || rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
  fi
done
exit "$status"
