#!/usr/bin/env bash
# The GPU measurements of issue 6, in parts that each fit one 10-minute device command (no install: the
# repo's src/ on PYTHONPATH; the GPU image has torch, transformers, peft and pytest):
#   bash benchmarks/gpu_session.sh 1  # the targets at this commit: fusedit-gemma2b, fusedit-large, the variants
#   bash benchmarks/gpu_session.sh 2  # the shallow baselines: training against resolution and batch, sampling
#   bash benchmarks/gpu_session.sh 3  # GPU tests, fast paths against slow, CUDA graphs, padded prompts
#   bash benchmarks/gpu_session.sh 4  # untrimmed padding, the EMA held on the host, a staged LoRA run under inductor
#   bash benchmarks/gpu_session.sh 5  # a lever for the targets: inductor's max-autotune, against part 1
#   bash benchmarks/gpu_session.sh 6  # the memory levers together: the EMA on the host, less recompute
# JSON lines (one object per measurement, written as it lands) and logs go to $OUT, or
# benchmarks/raw/DATE-gpu. Every process has its own time limit, so one slow point cannot sink a part;
# parts 1-3 take about 30 minutes with the machine's start. COMMIT=$(git rev-parse HEAD) names the commit
# where the device copy has no .git.
set -uo pipefail
part=${1:?usage: gpu_session.sh 1|2|3|4|5|6}
out=${OUT:-benchmarks/raw/$(date +%F)-gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Every JSON record names the commit (fusedit.bench.source_commit reads it where there is no .git).
[ -n "${COMMIT:-}" ] && export FUSEDIT_COMMIT=$COMMIT
log="$out/part$part.log"
{ date -u; echo "commit ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } >>"$log" 2>&1

bench() {  # bench NAME SECONDS ARGS...: one `fusedit bench` process, its JSON in $out/NAME.jsonl
  local name=$1 limit=$2
  shift 2
  echo "== fusedit bench $* ($name)" >>"$log"
  timeout "$limit" python3 -m fusedit bench "$@" --json "$out/$name.jsonl" >>"$log" 2>&1 || echo "!! $name exited $?" >>"$log"
}

case $part in
1)
  # The target configurations: training 512x16, 256x32, 256x64; sampling 4 prompts x 25 steps,
  # cached and uncached; the large model; the 2d-rope and no-timestep variants' MFU.
  bench gemma2b 230 fusedit-gemma2b --train-points 512x16 256x32 256x64 --prompts 4 1 --steps 25
  bench large 200 fusedit-large --train-points 512x16 --prompts 4 --steps 25
  bench rope2d 95 fusedit-2d-rope --what train --train-points 512x16
  bench notime 95 fusedit-no-timestep --what train --train-points 512x16
  ;;
2)
  # The shallow baselines, the target point first so a time limit cuts the sweep's tail, not the target.
  for preset in dit-self-gemma2b dit-cross-gemma2b; do
    bench "${preset%%-gemma2b}" 270 "$preset" --train-points 512x16 256x32 1024x4 256x64 512x8 512x32 1024x8 \
      --prompts 4 1 --steps 25 10 50 --cached-only --repeats 3
  done
  ;;
3)
  timeout 130 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py >>"$log" 2>&1 || echo "!! tests exited $?" >>"$log"
  echo "== check_fast_paths fusedit-gemma2b" >>"$log"
  timeout 90 python3 benchmarks/check_fast_paths.py fusedit-gemma2b >>"$log" 2>&1 || echo "!! fast paths exited $?" >>"$log"
  bench graphs 110 fusedit-gemma2b sample.cuda_graphs=true --what sample --prompts 1 4 --steps 25 --cached-only
  # Prompts of 32..256 real tokens, empty negative prompts: the masked attention path, trimmed to multiples
  # of 128 (the default on a GPU); part 1's gemma2b run is the same shape without padding.
  bench padded 200 fusedit-gemma2b --train-points 512x16 --prompts 4 --steps 25 --cached-only --min-text-tokens 32
  ;;
4)
  bench padded-notrim 150 fusedit-gemma2b text.trim_padding=false --train-points 512x16 --prompts 4 --steps 25 \
    --cached-only --min-text-tokens 32
  # The EMA's float32 DiT copy in host memory, averaged by a host thread beside the next steps: the peak
  # memory it saves, what its update adds to the steps it overlaps (ema_update_s).
  bench ema-offload 130 fusedit-gemma2b train.ema_offload=true --what train --train-points 512x16
  echo "== staged training with LoRA under inductor (recipe-shapes-3stage)" >>"$log"
  start=$SECONDS
  timeout 200 python3 -m fusedit train recipe-shapes-3stage train.compile=inductor --out /tmp/stages-run --quiet \
    >>"$log" 2>&1 || echo "!! staged run exited $?" >>"$log"
  echo "staged run: $((SECONDS - start)) s wall; last metrics:" >>"$log"
  tail -n 2 /tmp/stages-run/metrics.jsonl >>"$log" 2>/dev/null
  ;;
5)
  # compile "max-autotune" (kernel choice by timing) at the two target points part 1 measures with
  # "inductor"; its compile takes minutes, inside the warm-up. Compare with part 1 of the same session.
  bench autotune-train 330 fusedit-gemma2b train.compile=max-autotune --what train --train-points 512x16
  bench autotune-sample 230 fusedit-gemma2b sample.compile=max-autotune --what sample --prompts 4 --steps 25 \
    --cached-only
  ;;
6)
  # With the EMA's 9.1 GiB on the host, 512 px batch 16 may afford recomputing less than the preset's
  # activation_memory_budget 0.9 (about 1.5% of step time for 74 -> 58 GB without the EMA): does 0.95 or 1.0
  # stay within 64 GB, and how much of the 1.5% does it buy back? Compare with part 4's ema-offload.
  for budget in 0.95 1.0; do
    bench "ema-offload-budget$budget" 150 fusedit-gemma2b train.ema_offload=true \
      train.activation_memory_budget=$budget --what train --train-points 512x16
  done
  ;;
*)
  echo "unknown part $part (allowed: 1, 2, 3, 4, 5, 6)" >&2
  exit 2
  ;;
esac
echo "part $part done" >>"$log"
