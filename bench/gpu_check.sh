#!/usr/bin/env bash
# The checks that need a GPU, as one script (the device tool runs it once; see bench/RESULTS.md for what it
# printed). From the repository root, with torch, deepspeed and the project's requirements importable:
#   bash bench/gpu_check.sh            # OUT=<dir> keeps the logs there (default /tmp/gpu_check)
# 1. every ds_configs/*.json trains 3 steps of the tiny preset and evaluates once, fp16 included (CPU refuses it)
# 2. the paper recipe (rgbnt201, zero2 bf16) at its real preset for 3 steps on synthetic data
# 3. bench/train_step.py at paper shapes (MFU), and bench/gather.py where there are >= 2 GPUs
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
echo "== $(date -u +%F) $($PY -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")') x $NGPU"
[ "$NGPU" -ge 1 ] || { echo "error: no CUDA device"; exit 2; }
DATA=$OUT/data
$PY shards/synth.py --layout rgbnt201 --out "$DATA/raw" --ids 40 --cams 3 --per-cam 3 --seed 0 >/dev/null
$PY shards/build.py --dataset rgbnt201 --root "$DATA/raw" --out "$DATA/shards" --maxcount 64 >/dev/null
fail=0
for ds in ds_configs/*.json; do
  name=$(basename "$ds" .json)
  if deepspeed --num_gpus "$NGPU" launch/train.py --config configs/demo.yaml --deepspeed_config "$ds" \
      model.frm.ep_size=1 data.shards="$DATA/shards" train.out_dir="$OUT/run_$name" model.img_size=[128,64] \
      train.global_batch=32 train.epochs=1 train.steps_per_epoch=3 train.eval_first=false train.eval_missing=false \
      train.log_every=1 tracking.enabled=false > "$OUT/train_$name.log" 2>&1; then
    echo "config $name: OK, $(grep -o 'loss [0-9.]*' "$OUT/train_$name.log" | tail -1), mAP $($PY -c "import json; print(round(json.load(open('$OUT/run_$name/metrics.json'))['mAP'], 2))")"
  else
    echo "config $name: FAILED (tail of $OUT/train_$name.log below)"; tail -5 "$OUT/train_$name.log"; fail=1
  fi
done
deepspeed --num_gpus "$NGPU" launch/train.py --config configs/rgbnt201.yaml data.shards="$DATA/shards" \
  train.out_dir="$OUT/run_paper" train.epochs=1 train.steps_per_epoch=3 train.eval_missing=false train.log_every=1 \
  tracking.enabled=false > "$OUT/train_paper.log" 2>&1 && echo "paper recipe rgbnt201 (base, zero2 bf16): OK" \
  || { echo "paper recipe: FAILED"; tail -5 "$OUT/train_paper.log"; fail=1; }
$PY bench/train_step.py --device cuda --preset base --batch 64 --dtype bf16 2>&1 | tail -5
if [ "$NGPU" -ge 2 ]; then
  deepspeed --num_gpus "$NGPU" bench/gather.py --preset base --img 256 128 --micro 8 --dtype bf16 2>&1 | grep -A3 "gather cost"
else
  echo "bench/gather.py: needs >= 2 GPUs, skipped"
fi
exit $fail
