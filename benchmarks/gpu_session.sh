#!/usr/bin/env bash
# The GPU measurements of issue 6, in parts that each fit one 10-minute device command (no install: the
# repo's src/ on PYTHONPATH; the GPU image has torch, transformers, peft and pytest, no diffusers). A
# session's 30 minutes of device time (the machine's start included) hold about three parts: run them in
# this order, each at once after the last (the machine is handed back 30 s after a call ends).
#   bash benchmarks/gpu_session.sh 1  # the targets: fusedit-gemma2b (EMA on the GPU and on the host), fusedit-large
#   bash benchmarks/gpu_session.sh 2  # tests/test_gpu.py, fast paths against slow, the variants' MFU, less recompute
#   bash benchmarks/gpu_session.sh 3  # the shallow baselines' targets, uncached and 1-prompt sampling
#   bash benchmarks/gpu_session.sh 4  # the shallow baselines against resolution, batch and steps (the scaling tables)
#   bash benchmarks/gpu_session.sh 5  # padded prompts (trimmed and not), CUDA graphs
#   bash benchmarks/gpu_session.sh 6  # inductor's max-autotune, against part 1
#   bash benchmarks/gpu_session.sh 7  # a staged LoRA run under inductor, no recompute with the EMA on the host
# (Runs A-C were made with this script's earlier parts, numbered otherwise: see the commit each names.)
# JSON lines (one object per measurement, written as it lands) and logs go to $OUT, or
# benchmarks/raw/DATE-gpu. Every process has its own time limit, so one slow point cannot sink a part; the
# log stamps each line with the time, so the limits can be tuned. COMMIT names the commit where the device
# copy has no .git: COMMIT=$(git rev-parse HEAD)$(git diff --quiet HEAD || echo -dirty). Afterwards,
# `python benchmarks/check_targets.py <the output folder>` gives the targets' table from its JSON.
set -uo pipefail
part=${1:?usage: gpu_session.sh 1|2|3|4|5|6|7}
out=${OUT:-benchmarks/raw/$(date +%F)-gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Every JSON record names the commit (fusedit.bench.source_commit reads it where there is no .git).
[ -n "${COMMIT:-}" ] && export FUSEDIT_COMMIT=$COMMIT
log="$out/part$part.log"
{ date -u; echo "commit ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } >>"$log" 2>&1

stamp() { echo "== $(date -u +%T) (+${SECONDS}s) $*" >>"$log"; }

bench() {  # bench NAME SECONDS ARGS...: one `fusedit bench` process, its JSON in $out/NAME.jsonl
  local name=$1 limit=$2
  shift 2
  stamp "fusedit bench $* ($name)"
  timeout "$limit" python3 -m fusedit bench "$@" --json "$out/$name.jsonl" >>"$log" 2>&1 || echo "!! $name exited $? at +${SECONDS}s" >>"$log"
}

case $part in
1)
  # The target configurations at this commit: training 512x16, 256x32, 256x64 and cached sampling
  # of 4 prompts x 25 steps; the 512x16 point again with the EMA's float32 copy in host memory (the bench
  # holds it on the GPU by default: about 9.1 GiB more than runs A-C, over the 64 GB target); the large model.
  bench gemma2b 250 fusedit-gemma2b --train-points 512x16 256x32 256x64 --prompts 4 --steps 25 --cached-only
  bench ema-offload 120 fusedit-gemma2b train.ema_offload=true --what train --train-points 512x16
  bench large 180 fusedit-large --train-points 512x16 --prompts 4 --steps 25 --cached-only
  ;;
2)
  stamp "tests/test_gpu.py"
  timeout 130 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py >>"$log" 2>&1 || echo "!! tests exited $?" >>"$log"
  stamp "check_fast_paths fusedit-gemma2b"
  timeout 90 python3 benchmarks/check_fast_paths.py fusedit-gemma2b >>"$log" 2>&1 || echo "!! fast paths exited $?" >>"$log"
  # The variants' MFU (within 5 points of part 1's gemma2b).
  bench rope2d 95 fusedit-2d-rope --what train --train-points 512x16
  bench notime 95 fusedit-no-timestep --what train --train-points 512x16
  # With the EMA's 9.1 GiB on the host, 512 px batch 16 may afford recomputing less than the preset's
  # activation_memory_budget 0.9 (about 1.5% of step time for 74 -> 58 GB without the EMA): does 0.95 stay
  # within 64 GB, and how much of the 1.5% does it buy back? Compare with part 1's ema-offload.
  bench ema-offload-budget0.95 110 fusedit-gemma2b train.ema_offload=true train.activation_memory_budget=0.95 \
    --what train --train-points 512x16
  ;;
3)
  # The shallow baselines' MFU at the target point (within 5 points of fusedit-gemma2b's) and their cached
  # sampling; the public code's other sampling figures (uncached, 1 prompt); the large model uncached.
  for preset in dit-self-gemma2b dit-cross-gemma2b; do
    bench "${preset%%-gemma2b}-target" 120 "$preset" --train-points 512x16 --prompts 4 --steps 25 --cached-only
  done
  bench gemma2b-sampling 120 fusedit-gemma2b --what sample --prompts 4 1 --steps 25
  bench large-uncached 110 fusedit-large --what sample --prompts 4 --steps 25
  ;;
4)
  # The scaling tables: the shallow baselines against resolution, batch and steps, the target point first
  # so a time limit cuts the sweep's tail, not the target.
  for preset in dit-self-gemma2b dit-cross-gemma2b; do
    bench "${preset%%-gemma2b}" 270 "$preset" --train-points 512x16 256x32 1024x4 256x64 512x8 512x32 1024x8 \
      --prompts 4 1 --steps 25 10 50 --cached-only --repeats 3
  done
  ;;
5)
  # Prompts of 32..256 real tokens, empty negative prompts: the masked attention path, trimmed to multiples
  # of 128 (the default on a GPU) and untrimmed; part 1's gemma2b is the same shape without padding.
  # Training and sampling in processes of their own (run C lost a sampling point to one shared limit).
  bench padded-train 120 fusedit-gemma2b --what train --train-points 512x16 --min-text-tokens 32
  bench padded-sample 90 fusedit-gemma2b --what sample --prompts 4 --steps 25 --cached-only --min-text-tokens 32
  bench padded-notrim-train 120 fusedit-gemma2b text.trim_padding=false --what train --train-points 512x16 \
    --min-text-tokens 32
  bench padded-notrim-sample 90 fusedit-gemma2b text.trim_padding=false --what sample --prompts 4 --steps 25 \
    --cached-only --min-text-tokens 32
  # Each timed batch captures its graph anew, as `generate` does: not the steady-state gain.
  bench graphs 110 fusedit-gemma2b sample.cuda_graphs=true --what sample --prompts 1 4 --steps 25 --cached-only
  ;;
6)
  # compile "max-autotune" (kernel choice by timing) at the two target points part 1 measures with
  # "inductor"; its compile takes minutes, inside the warm-up. Compare with part 1 of the same session.
  bench autotune-train 330 fusedit-gemma2b train.compile=max-autotune --what train --train-points 512x16
  bench autotune-sample 230 fusedit-gemma2b sample.compile=max-autotune --what sample --prompts 4 --steps 25 \
    --cached-only
  ;;
7)
  stamp "staged training with LoRA under inductor (recipe-shapes-3stage)"
  start=$SECONDS
  timeout 240 python3 -m fusedit train recipe-shapes-3stage train.compile=inductor --out /tmp/stages-run --overwrite \
    --quiet >>"$log" 2>&1 || echo "!! staged run exited $?" >>"$log"
  echo "staged run: $((SECONDS - start)) s wall; last metrics:" >>"$log"
  tail -n 2 /tmp/stages-run/metrics.jsonl >>"$log" 2>/dev/null
  bench ema-offload-budget1.0 150 fusedit-gemma2b train.ema_offload=true train.activation_memory_budget=1.0 \
    --what train --train-points 512x16
  ;;
*)
  echo "unknown part $part (allowed: 1, 2, 3, 4, 5, 6, 7)" >&2
  exit 2
  ;;
esac
echo "part $part done at +${SECONDS}s" >>"$log"
