#!/usr/bin/env bash
# The accelerator check, sized for one lent GPU (or TPU) machine in under 8 minutes:
#   1. the Pallas kernels against the XLA path on the device (tests/test_device_kernels.py: forward,
#      first and second order, float32 and bfloat16);
#   2. bench-kernels: Pallas vs XLA per StyleGAN2 layer at 256 px, with the copy bandwidth and the
#      fraction of it each kernel reaches, and the tuning table impl="auto" reads on this device kind
#      (OUT/tuning/<device kind>.json: copy it into kernels/tuning/ to ship it);
#   3. bench-stylegan2: the whole training step at 256 px, paper256 widths, batch 32, XLA and Pallas.
# Each part writes its log and JSON into OUT as soon as it ends and adds a row to OUT/summary.md, so a
# timeout keeps what finished.
#
#   launch/device_check.sh --prepare     here (pip reaches the registry): .whl/ with this project's
#                                        wheel and the packages an accelerator image lacks
#   launch/device_check.sh OUT           there, from the repository root (carry .whl)
#
# The accelerator's own JAX (jax[cuda12], jax[tpu], or the image's) is used as installed: the wheels
# are installed with --no-deps, so they never replace it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "--prepare" ]; then
  # ml_collections and grain (with the parts of grain a bare image lacks); Python 3.12, manylinux x86-64
  rm -rf .whl && mkdir -p .whl
  $PY -m pip wheel -q --no-deps -w .whl . || exit 1
  plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64)
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version "${DEVICE_PYTHON:-3.12}" --implementation cp \
    "${plat[@]}" -d .whl ml_collections grain array_record dm-tree more-itertools || exit 1
  ls -la .whl
  exit 0
fi

OUT=${1:?usage: launch/device_check.sh OUT | --prepare}
mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}  # the --prepare folder (WHEELS=none: use what is installed)
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/device_check_site \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/device_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1

{
  echo "# Device check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  $PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'backend', jax.default_backend()); print(jax.devices())" 2>&1
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo
  echo "| part | exit status | seconds | files |"
  echo "| --- | --- | --- | --- |"
} > "$OUT/summary.md"

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, one summary row
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "| $name | $rc$( [ $rc = 124 ] && echo ' (time limit)') | $(( $(date +%s) - start )) | $(cd "$OUT" && ls "$name".* | tr '\n' ' ') |" >> "$OUT/summary.md"
}

part device_kernels "${TESTS_SECONDS:-150}" $PY -m pytest -q -p no:cacheprovider -o addopts="" \
  tests/test_device_kernels.py --junitxml="$OUT/device_kernels.xml"
part bench_kernels "${KERNELS_SECONDS:-150}" $PY -m viscoin_jax.cli bench-kernels --resolutions 256 \
  --json "$OUT/bench_kernels.json" --write-table "$OUT/tuning"
part bench_stylegan2_xla "${STEP_SECONDS:-90}" $PY -m viscoin_jax.cli bench-stylegan2 --resolutions 256 --batch 32 \
  --widths paper256 --impl xla --periods 1 --json "$OUT/bench_stylegan2_xla.json"
part bench_stylegan2_pallas "${STEP_SECONDS:-90}" $PY -m viscoin_jax.cli bench-stylegan2 --resolutions 256 --batch 32 \
  --widths paper256 --impl pallas --periods 1 --json "$OUT/bench_stylegan2_pallas.json"
cat "$OUT/summary.md"
