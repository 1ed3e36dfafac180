#!/usr/bin/env bash
# Every GPU figure of the speed table, on one GPU, in under 5 minutes; writes a Markdown report.
#
#     bash benchmarks/gpu.sh [REPORT.md]          # on a GPU machine (report: $OUT/gpu-benchmarks.md or ./)
#     SMOKE=1 bash benchmarks/gpu.sh /tmp/r.md     # the same steps, tiny and on the CPU: checks the script
#
# Needs torch with CUDA; diffusers and the other Python packages it lacks are installed from the wheels in
# $WHEELS (default ./wheels) when they are missing (machines without internet: carry the wheels there).
# Measures: the bare model step (benchmarks/bench_models.py, compiled and not), the real `facegen train`
# loop for dit-s and dit-l-face128 (images/s and MFU from RUN/log.jsonl), and `facegen generate -n 1024`
# wall time, start-up included.
set -euo pipefail
cd "$(dirname "$0")/.."
REPORT=${1:-${OUT:-.}/gpu-benchmarks.md}
WORK=$(mktemp -d)
WHEELS=${WHEELS:-wheels}

python - <<'EOF' || pip install --no-index --find-links "$WHEELS" --no-deps "$WHEELS"/*.whl
import diffusers, typer, rich, accelerate  # noqa: F401
EOF
pip install --no-deps --no-build-isolation -q -e . 2>/dev/null || export PYTHONPATH=$PWD

if [ "${SMOKE:-0}" = 1 ]; then
    DEVICE=cpu; PRESETS="tiny"; LOOP="tiny:16:20"; GENERATE=8; BENCH_BATCH=8; FACES=256
    PEAK="" COMPILE_RUNS="--no-compile"
else
    DEVICE=cuda; PRESETS="dit-s dit-l-face128"; LOOP="dit-s:256:300 dit-l-face128:256:200"
    GENERATE=1024; BENCH_BATCH=256; FACES=8192; COMPILE_RUNS="--compile"
    # Dense bf16 peak of the GPU, TFLOP/s, for MFU (H100/H200 SXM: 989).
    PEAK=${PEAK_TFLOPS:-989}
fi

{
    echo "# facegen GPU benchmarks — $(date -u +%F), $(python -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")'), torch $(python -c 'import torch; print(torch.__version__)')"
    echo
    echo "## The bare model step (benchmarks/bench_models.py, batch $BENCH_BATCH, bf16)"
    echo
    for compile in "" --compile; do
        [ "${SMOKE:-0}" = 1 ] && [ -n "$compile" ] && continue  # compiling on a CPU takes minutes
        echo "### ${compile:-not compiled}"
        python benchmarks/bench_models.py --device $DEVICE --presets $PRESETS --batch $BENCH_BATCH --repeats 3 \
            --precisions bf16 $compile ${PEAK:+--peak-tflops $PEAK} | grep "^|"
        echo
    done
} > "$REPORT"

# A latent cache of built-in faces for the loop (its content does not matter to the speed).
facegen data synth "$WORK/faces" --count $FACES --size 128 > /dev/null 2>&1
facegen encode "$WORK/faces" --vae facegen_cli/faces/vae --out "$WORK/latents" --device $DEVICE \
    --batch-size 256 > /dev/null 2>&1

{
    echo "## The real loop (facegen train --precision bf16), steady state"
    echo
    echo "| preset | batch | steps | images/s | MFU |"
    echo "|---|---|---|---|---|"
    for run in $LOOP; do
        IFS=: read -r preset batch steps <<< "$run"
        facegen train --data "$WORK/latents" --preset "$preset" --batch-size "$batch" --steps "$steps" \
            --precision bf16 $COMPILE_RUNS --out "$WORK/run-$preset-$batch" > /dev/null 2>&1
        python - "$WORK/run-$preset-$batch/log.jsonl" "$preset" "$batch" "$steps" "${PEAK:-0}" <<'EOF'
import json, sys, torch
from torch.utils.flop_counter import FlopCounterMode
from facegen_cli.attributes import DEFAULT_ATTRIBUTES
from facegen_cli.config import load_preset
from facegen_cli.model import LatentDiT
log, preset, batch, steps, peak = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
records = [json.loads(line) for line in open(log)]
steady = records[len(records) // 2:]  # after compilation and warm-up
speed = sum(r["images_per_s"] for r in steady) / len(steady)
m = load_preset(preset).model
model = LatentDiT(attributes=DEFAULT_ATTRIBUTES, **m)
with FlopCounterMode(display=False) as counter:
    model(torch.randn(1, m["latent_channels"], m["latent_size"], m["latent_size"]), torch.rand(1), torch.zeros(1, 12))
train_flops = 3 * counter.get_total_flops()  # forward + backward
mfu = f"{100 * speed * train_flops / (peak * 1e12):.1f}%" if peak else "n/a"
print(f"| {preset} | {batch} | {steps} | {speed:,.0f} | {mfu} |")
EOF
    done
    echo
    echo "## facegen generate -n $GENERATE (the shipped faces model, wall time with start-up)"
    echo
    start=$(date +%s.%N)
    facegen generate -n $GENERATE --seed 0 --device $DEVICE --out "$WORK/generated" > /dev/null 2>&1
    end=$(date +%s.%N)
    echo "$(python -c "print(f'{$end - $start:.1f}')") s for $GENERATE faces ($(ls "$WORK/generated" | wc -l) files)"
} >> "$REPORT"
rm -rf "$WORK"
echo "$REPORT"
