#!/usr/bin/env bash
# The GPU checks of benchmarks/README.md in one call on a lent GPU machine (see "gpu_throughput").
# Needs PYTHONPATH to reach omegaconf and opacus besides the repository. Optional: a copy of an
# earlier commit's common/, conf/ and benchmarks/ in BASELINE_DIR, timed the same way beside it
# (and its book-keeping class timed beside the current one inside the dp_overhead run).
# Writes every log under ${OUT:-gpu_check_logs}/.
set -u
out=${OUT:-gpu_check_logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
peak=${PEAK_TFLOPS:-989}
run() {  # name, time limit (s), command...
    local name=$1 limit=$2; shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt" | grep -v "^USDT\|^ERROR.*gpuGetDevice\|UserWarning\|self.profiler"
}
run base1024 200 python3 benchmarks/gpu_throughput.py --preset base --batch-size 1024 --peak-tflops "$peak" \
    --steps 10 --warmup 8 --profile 3
if [ -n "${BASELINE_DIR:-}" ]; then
    (cd "$BASELINE_DIR" && run baseline1024 150 python3 benchmarks/gpu_throughput.py --preset base \
        --batch-size 1024 --peak-tflops "$peak" --steps 10 --warmup 8)
fi
dp_baseline=()
if [ -n "${BASELINE_DIR:-}" ] && [ -f "$BASELINE_DIR/common/privacy/bookkeeping.py" ]; then
    dp_baseline=(--bookkeeping-baseline "$BASELINE_DIR/common/privacy/bookkeeping.py")
fi
run dp_base256 150 python3 benchmarks/dp_overhead.py --preset base --batch-size 256 --steps 10 --warmup 3 --block 2 \
    ${dp_baseline[@]+"${dp_baseline[@]}"}
run base256 120 python3 benchmarks/gpu_throughput.py --preset base --batch-size 256 --peak-tflops "$peak" \
    --steps 20 --warmup 8
