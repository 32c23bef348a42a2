#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single- or multi-host): copy this repository to every worker,
# install it with JAX for TPU, then start `viscoin-jax train` on all workers at once. Each worker
# runs one process; they find each other through the TPU metadata server
# (viscoin_jax/training/distributed.py).
#
# usage: TPU=NAME ZONE=ZONE launch/tpu_pod.sh CONFIG[:VARIANT] WORKDIR [--config.a.b=VALUE ...]
#   WORKDIR must be the same shared directory on every worker (a gcsfuse or Filestore mount):
#   all hosts write their shards of each checkpoint there.
# Environment: PROJECT (gcloud project), REMOTE_DIR (default: viscoin-jax, in the home directory),
#   SKIP_INSTALL=1 (reuse the installed environment), DETACH=1 (run under nohup, log to
#   REMOTE_DIR/train.log, and return at once; the job survives a dropped ssh connection).
# Preemption: a maintenance event sends SIGTERM; the run saves a checkpoint and stops, and
# running this script again resumes it.
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
: "${TPU:?set TPU to the name of the TPU VM}"
: "${ZONE:?set ZONE to the zone of the TPU VM}"
config=$1
workdir=$2
shift 2
remote=${REMOTE_DIR:-viscoin-jax}

gcloud_args=(--zone "$ZONE")
if [ -n "${PROJECT:-}" ]; then gcloud_args+=(--project "$PROJECT"); fi

# Ship the working tree (tracked and untracked files, without what .gitignore excludes).
repo=$(cd "$(dirname "$0")/.." && pwd)
tarball=$(mktemp -t viscoin-jax-XXXXXX.tar.gz)
trap 'rm -f "$tarball"' EXIT
git -C "$repo" ls-files -z --cached --others --exclude-standard |
  tar -C "$repo" --null -T - -czf "$tarball"
gcloud compute tpus tpu-vm scp "$tarball" "$TPU:/tmp/viscoin-jax.tar.gz" --worker=all "${gcloud_args[@]}"

# shell-quote the arguments for the remote command line (nothing at all for no arguments)
q() {
  if [ $# -eq 0 ]; then return; fi
  local out
  out=$(printf '%q ' "$@")
  printf '%s' "${out% }"
}
train_cmd="VISCOIN_DISTRIBUTED=1 python3 -m viscoin_jax.cli train --config $(q "$config") --workdir $(q "$workdir") $(q "$@")"
if [ -n "${DETACH:-}" ]; then
  train_cmd="nohup bash -c $(q "$train_cmd") > train.log 2>&1 < /dev/null &"
fi
install_cmd="python3 -m pip install --quiet --upgrade pip && python3 -m pip install --quiet -e . 'jax[tpu]'"
if [ -n "${SKIP_INSTALL:-}" ]; then install_cmd=true; fi

remote_cmd="set -e; mkdir -p $(q "$remote"); tar -xzf /tmp/viscoin-jax.tar.gz -C $(q "$remote"); cd $(q "$remote"); $install_cmd; $train_cmd"
gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${gcloud_args[@]}" --command "$remote_cmd"
