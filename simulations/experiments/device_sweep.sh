#!/usr/bin/env bash
# One call on a lent GPU machine: the method sweep of docs/results.md ("Choosing the defaults on real
# digits"). The digits experiment runs on the GPU (its runs are the long ones), the synthetic one on
# the machine's spare CPU cores, both through `fedvitgan experiment` (validation split for choices).
# Needs: .whl/ (hydra-core, omegaconf, antlr4 wheels) and .sweepdata/mnist5k (fetched digits).
# Usage there: bash simulations/experiments/device_sweep.sh  (writes $OUT/{digits,synthetic}.{json,md,log})
# VARIANTS='[a,b]' picks the variants, SKIP_SYNTHETIC=1 runs the digits alone, LIMIT caps each experiment's seconds.
set -u
out=${OUT:-sweep_logs}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
nproc
VARIANTS=${VARIANTS:-"[plain,semi_supervised,unified,sweep_plain_gan,sweep_co_fm]"}
LIMIT=${LIMIT:-500}
SKIP_SYNTHETIC=${SKIP_SYNTHETIC:-0}
start=$(date +%s)
timeout "$LIMIT" python3 -m simulations.cli experiment experiment=digits_few_labels data.root=.sweepdata/mnist5k \
    "experiment.variants=$VARIANTS" 'experiment.settings=[centralized]' experiment.workers=${GPU_WORKERS:-10} \
    device=cuda hydra.run.dir=/tmp/sweep_digits > "$out/digits.log" 2>&1 &
[ "$SKIP_SYNTHETIC" = 1 ] || timeout "$LIMIT" python3 -m simulations.cli experiment experiment=few_labels \
    "experiment.variants=$VARIANTS" 'experiment.settings=[centralized]' experiment.workers=${CPU_WORKERS:-6} \
    experiment.generator_quality.enabled=false device=cpu hydra.run.dir=/tmp/sweep_synthetic > "$out/synthetic.log" 2>&1 &
wait
echo "wall seconds: $(( $(date +%s) - start ))"
for name in digits synthetic; do
    [ -f "$out/$name.log" ] || continue
    cp /tmp/sweep_$name/results.json "$out/$name.json" 2>/dev/null
    cp /tmp/sweep_$name/results.md "$out/$name.md" 2>/dev/null
    grep -E "^\[" "$out/$name.log" | tail -40
    tail -3 "$out/$name.log"
done
