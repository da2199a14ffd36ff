#!/usr/bin/env bash
# One-shot GPU check (a CUDA machine with torch, triton, numpy, pytest, pytest-benchmark and
# nvidia-ml-py, but perhaps without diffusers/xformers/bitsandbytes and without network).
#
#   wheels:  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#              --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#              -d .whl diffusers transformers safetensors tokenizers huggingface-hub xformers bitsandbytes \
#              peft tqdm pyyaml pillow regex scikit-learn scipy joblib threadpoolctl open-clip-torch
#            (first check which of these the machine already has: the carried tree is capped at 64 MiB,
#            and scipy alone is large; the digits data needs scikit-learn)
#   run:     OUT=/some/dir bash bench/gpu_check.sh      (each stage has its own time limit)
#            OUT=/some/dir bash bench/gpu_check.sh plan (only bench/run.py plan-step on the 12B Flux)
#
# Writes under $OUT: info.txt, gpu_tests.txt, bench_adamw.json, bench_adamw_lowp.json (fp32 / bf16 /
# 8-bit moment kernels against bitsandbytes' blockwise update and its per-tensor AdamW8bit), and the
# savings and optimizer suites of bench/run.py (sd15 preset, 512 px, bf16, batch 4).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The package without installing it: freezeasguard.engine / .kernels point at this checkout.
mkdir -p /tmp/fag/freezeasguard
ln -sfn "$PWD/engine" /tmp/fag/freezeasguard/engine
ln -sfn "$PWD/kernels" /tmp/fag/freezeasguard/kernels
export PYTHONPATH=/tmp/fag:${PYTHONPATH:-}

stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt" | tail -25
  echo "== $name exit ${PIPESTATUS[0]}"
}
if [ "${1:-}" = "plan" ]; then  # a second call: the real guarded step of the 12B Flux plan
  # FLUX.1-sized transformer, 50% frozen, 256 px, batch 1: the compact setup (plan 44.7 GiB) and the
  # plain engine (99.9 GiB), max_memory_allocated next to the plan's and the ledger's bytes
  stage plan_step 540 python3 bench/run.py plan-step --preset flux --setups engine+8bit+in-backward,engine \
    --resolution 256 --out "$OUT"
  exit 0
fi
# Budget: under 10 minutes in all (the stage limits sum to 570 s), most important first.
stage info 20 python3 -m freezeasguard.engine.cli info
stage gpu_tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_adamw.py tests/test_adamw_lowp.py \
  tests/test_mask_update.py tests/test_attention.py tests/test_frozen_ops.py tests/test_ledger.py tests/test_profiling.py \
  tests/test_optim_flat.py tests/test_peak.py
stage bench_adamw 60 python3 -m pytest -q -p no:cacheprovider bench/bench_adamw.py --benchmark-enable \
  --benchmark-json "$OUT/bench_adamw.json"
stage bench_adamw_lowp 60 python3 -m pytest -q -p no:cacheprovider bench/bench_adamw_lowp.py --benchmark-enable \
  --benchmark-json "$OUT/bench_adamw_lowp.json"
# sd15, 512 px, bf16, batch 4: full / naive / engine and every engine option side by side, with each
# scenario's own CUDA peak (max_memory_allocated during its step above what was allocated before it)
stage run_savings 240 python3 bench/run.py savings --steps 8 --warmup 2 --out "$OUT"
stage run_optimizer 40 python3 bench/run.py optimizer --steps 5 --out "$OUT"
