#!/usr/bin/env bash
# Every GPU check in one run, for a machine with CUDA (each step also runs on CPU, slowly):
#   1. quantized loading and extraction on the device (benchmarks.device_check), every quantization;
#   2. where extraction time goes, stage by stage, at bf16 (benchmarks.stages), 3 and 9 sites;
#   3. the extraction benchmark at bf16, then at every quantization (benchmarks.extraction);
#   4. the stage profile of a wider model (12 × 2048), where the forward outweighs the output.
# optimum-quanto compiles its CUDA kernels (Q2) at first use: that build starts in the background
# at once and the Q2 steps wait for it.
#
#   bash benchmarks/gpu.sh OUT_DIR
#
# OUT_DIR/results.jsonl gets one line per step: {"step", "rc", "seconds", "result": last JSON line};
# OUT_DIR/gpu.log the full output. Steps are independent: one that fails does not stop the rest.
set -u
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
log="$out/gpu.log"
results="$out/results.jsonl"

step() {  # step NAME TIMEOUT_S ARGS… : run `python -m ARGS…`, record its last line
  local name=$1 limit=$2 start rc last
  shift 2
  echo "== $name: $*" | tee -a "$log"
  start=$(date +%s)
  timeout "$limit" "$py" -m "$@" > "$out/.step.out" 2>&1
  rc=$?
  cat "$out/.step.out" >> "$log"
  last=$(tail -n 1 "$out/.step.out")
  case "$last" in "{"*) ;; *) last=null ;; esac
  printf '{"step": "%s", "rc": %d, "seconds": %d, "result": %s}\n' \
    "$name" "$rc" "$(($(date +%s) - start))" "$last" >> "$results"
  echo "== $name: rc=$rc in $(($(date +%s) - start)) s" | tee -a "$log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$py" -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
} 2>&1 | tee -a "$log"

"$py" -c "import torch
from optimum.quanto.library.extensions import get_extension, is_extension_available
if torch.cuda.is_available() and is_extension_available('quanto_cuda'):
    get_extension('quanto_cuda').lib
" > "$out/quanto-build.log" 2>&1 &
quanto_build=$!

step check_fp16_q8_q4 240 benchmarks.device_check --quantizations FP16,Q8,Q4
step stages_bf16 240 benchmarks.stages --dtype bfloat16
step stages_bf16_all_hooks 240 benchmarks.stages --dtype bfloat16 --hooks all
step bench_bf16 300 benchmarks.extraction --dtype bfloat16 --no-peers --no-memory --repeats 5
echo "== waiting for the optimum-quanto CUDA build" | tee -a "$log"
wait "$quanto_build"
echo "== quanto build rc=$?" | tee -a "$log"
step check_q2 180 benchmarks.device_check --quantizations Q2
step bench_all 400 benchmarks.extraction --quantization all --no-peers --no-memory --repeats 3
step stages_wide_bf16 240 benchmarks.stages --dtype bfloat16 --shape 12x2048 --sequences 256 \
  --repeats 3
rm -f "$out/.step.out"
