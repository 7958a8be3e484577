#!/usr/bin/env bash
# GPU checks in one short call (about 5 minutes on one recent GPU, 8 at most):
#   1. the `gpu`-marked tests (timm equivalence on CUDA, fp16/bf16 runs and caches);
#   2. the forward and projection benchmarks at fp32 and bf16, with ratios to timm;
#   3. with more than one GPU: a 2-process torchrun identify run (nccl) equal to one process.
# Without CUDA (or with --dry-run) it prints every step it skips and exits 0, so CI can run it.
#
#   bash benchmarks/gpu_check.sh             # results (JSON, logs) in gpu_check_out/
#   bash benchmarks/gpu_check.sh --dry-run   # list the steps only
#   PYTHON=.venv/bin/python GPU_CHECK_OUT=/tmp/gc bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-gpu_check_out}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

dry=0
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "gpu_check.sh: unknown option '$1'; use --dry-run or nothing" >&2; exit 2 ;;
esac
n_gpu=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [[ $dry == 0 && $n_gpu == 0 ]]; then
  echo "gpu_check: no CUDA device found: dry run (every GPU step below is skipped)"
  dry=1
fi

step() {  # step SECONDS NAME COMMAND...: run one check under a time limit, or say it is skipped
  local limit=$1 name=$2; shift 2
  if [[ $dry == 1 ]]; then
    echo "skip: $name: $*"
    return 0
  fi
  echo "+ [$name, <= ${limit}s] $*"
  # A failed step is recorded and the next one still runs: device time is scarce.
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || failed+=("$name")
}
failed=()

[[ $dry == 1 ]] || mkdir -p "$OUT"
step 150 gpu_tests "$PY" -m pytest -q -m gpu tests/test_gpu.py
for dtype in fp32 bf16; do
  atol=1e-4; [[ $dtype == bf16 ]] && atol=0.05
  step 60 "forward_$dtype" "$PY" benchmarks/forward.py --device cuda --models vit_base_patch16_224 \
    --batch-size 64 --repeats 10 --dtype "$dtype" --atol "$atol" --json "$OUT/forward_$dtype.json"
  step 60 "identify_$dtype" "$PY" benchmarks/identify.py --device cuda --model vit_base_patch16_224 \
    --batch-size 64 --repeats 7 --dtype "$dtype" --json "$OUT/identify_$dtype.json"
done
if [[ $dry == 1 || $n_gpu -gt 1 ]]; then
  step 60 one_process env DEVICE=cuda "$PY" tests/distributed_driver.py identify "$OUT/run_one" 256 32
  step 90 torchrun_2 env DEVICE=cuda "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 \
    tests/distributed_driver.py identify "$OUT/run_two" 256 32
  step 30 compare "$PY" tests/distributed_driver.py compare "$OUT/run_one" "$OUT/run_two"
else
  echo "skip: torchrun_2: one GPU only (needs 2)"
fi
if (( ${#failed[@]} )); then
  echo "gpu_check: failed steps: ${failed[*]} (logs in $OUT/)" >&2
  exit 1
fi
echo "gpu_check: done$([[ $dry == 1 ]] && echo ' (dry run)')"
