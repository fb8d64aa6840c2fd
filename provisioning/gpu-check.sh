#!/usr/bin/env bash
# One GPU check for one H100/H200: the engine's self-test on CUDA, then the benchmark at Moshi 7B shapes
# with random weights (no download), bf16 and FP8, CUDA graphs on. Writes ONE JSON (default
# ./gpu-check.json) holding both reports, the targets and their verdicts; "ok" is its last key.
#
#   provisioning/gpu-check.sh [OUT.json]
#
# Environment: PYTHON (default .venv/bin/python, else python3), GPU_CHECK_SLOTS (1,8,16,32,64),
# GPU_CHECK_DTYPES (bf16,fp8), GPU_CHECK_TICKS (40), GPU_CHECK_SHAPE (moshi-7b), GPU_CHECK_DEVICE (cuda).
# Budget: about 5 minutes on an H200; each step has its own timeout so one hang cannot eat the rest.
set -uo pipefail
cd "$(dirname "$0")/.."

out=${1:-gpu-check.json}
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
slots=${GPU_CHECK_SLOTS:-1,8,16,32,64}
dtypes=${GPU_CHECK_DTYPES:-bf16,fp8}
ticks=${GPU_CHECK_TICKS:-40}
shape=${GPU_CHECK_SHAPE:-moshi-7b}
device=${GPU_CHECK_DEVICE:-cuda}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1

step() {  # step NAME TIMEOUT_S CMD...: stdout to $work/NAME.json, stderr shown as it goes
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "gpu-check: $name ..." >&2
  timeout --signal=INT --kill-after=20 "$limit" "$@" >"$work/$name.json"
  local rc=$?
  echo "{\"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >"$work/$name.rc"
  echo "gpu-check: $name rc=$rc in $((SECONDS - t0)) s" >&2
}

step selftest 150 "$py" -m admin_cli.main engine selftest --device "$device" --json
step bench 360 "$py" -m admin_cli.main bench engine --model "random:$shape" --device "$device" \
  --slots "$slots" --dtype "$dtypes" --ticks "$ticks" --warmup 5 --json

"$py" -m engine.moshi.gpucheck "$work" >"$out"
rc=$?
cat "$out"
echo "gpu-check: wrote $out" >&2
exit $rc
