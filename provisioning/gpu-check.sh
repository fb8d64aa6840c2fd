#!/usr/bin/env bash
# One GPU check for one H100/H200, in about 6 minutes: the engine's self-test on CUDA, then benchmarks at
# Moshi 7B shapes with random weights (no download), CUDA graphs on:
#   selftest   tiny model: isolation (greedy, sampling, adapters, FP8 KV), reference agreement, finite idle
#              slots, CUDA graphs captured                                         (bf16 and fp8 weights)
#   bench      slots 1,8,16,32,64 x bf16,fp8 weights                  -> tick p50/p99, FP8 speed-up
#   capacity   slots 64,128 with FP8 weights and FP8 KV cache         -> 64-slot p99, 128 slots fit?
#              plus the FP8 KV cache's token agreement with bf16 KV
#   adapters   slots 1,32 with 0 and 3 rank-16 adapters (bf16)        -> adapter cost, load and start times
#   plan       the memory plan for this GPU and for an 80 GiB H100
# and writes ONE JSON (default ./gpu-check.json) holding every report, the targets and their verdicts;
# "ok" is its last key.
#
#   provisioning/gpu-check.sh [OUT.json]
#
# Environment: PYTHON (default .venv/bin/python, else python3), GPU_CHECK_SHAPE (moshi-7b),
# GPU_CHECK_DEVICE (cuda), GPU_CHECK_TICKS (30), GPU_CHECK_QUICK=1 (tiny shape, few slots: a dry run).
# Each step has its own timeout so one hang cannot eat the rest; a failed step is reported, not fatal.
#
# On a machine with torch but not this project's venv (a lent GPU box that cannot reach PyPI), bring the
# pure-Python wheels along and put them on PYTHONPATH:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl moshi==0.2.13 pydantic \
#     pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv   # (here)
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl       # (there)
#   PYTHONPATH=/tmp/site PYTHON=python3 provisioning/gpu-check.sh gpu-check.json
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

out=${1:-gpu-check.json}
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
shape=${GPU_CHECK_SHAPE:-moshi-7b}
device=${GPU_CHECK_DEVICE:-cuda}
ticks=${GPU_CHECK_TICKS:-30}
slots=1,8,16,32,64 capacity=64,128 adapter_slots=1,32
if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then
  shape=tiny slots=1,4 capacity=2,4 adapter_slots=1,4 ticks=3
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1
admin=("$py" -m admin_cli.main)

step() {  # step NAME TIMEOUT_S CMD...: stdout to $work/NAME.json, stderr shown as it goes
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "gpu-check: $name ..." >&2
  timeout --signal=INT --kill-after=20 "$limit" "$@" >"$work/$name.json"
  local rc=$?
  echo "{\"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >"$work/$name.rc"
  echo "gpu-check: $name rc=$rc in $((SECONDS - t0)) s" >&2
}

step selftest 120 "${admin[@]}" engine selftest --device "$device" --json
step bench 150 "${admin[@]}" bench engine --model "random:$shape" --device "$device" \
  --slots "$slots" --dtype bf16,fp8 --ticks "$ticks" --warmup 5 --json
step capacity 100 "${admin[@]}" bench engine --model "random:$shape" --device "$device" \
  --slots "$capacity" --dtype fp8 --kv-dtype fp8 --ticks "$ticks" --warmup 5 --json
step adapters 80 "${admin[@]}" bench engine --model "random:$shape" --device "$device" \
  --slots "$adapter_slots" --dtype bf16 --adapters 0,3 --ticks "$ticks" --warmup 5 --json
gpu_bytes=$("$py" -c 'import torch; print(torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 << 30)')
step plan 20 "${admin[@]}" engine plan --gpu-memory "$gpu_bytes" --shape "$shape" --dtype fp8 --kv-dtype fp8 --json
step plan_h100 20 "${admin[@]}" engine plan --gpu-memory 80GiB --shape "$shape" --dtype fp8 --kv-dtype fp8 --json

"$py" -m engine.moshi.gpucheck "$work" >"$out"
rc=$?
cat "$out"
echo "gpu-check: wrote $out" >&2
exit $rc
