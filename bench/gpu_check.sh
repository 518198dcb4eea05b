#!/usr/bin/env bash
# The checks that need a GPU, as one script (< 8 minutes on one H100/H200; the device tool runs it once and
# bench/RESULTS.md records what it printed). From the repository root:
#   bash bench/gpu_check.sh             # OUT=<dir> keeps the logs there (default /tmp/gpu_check)
# The GPU machine has torch but not deepspeed, webdataset or wids: `bash bench/gpu_wheels.sh` here
# fills .whl/ (ignored by git); carry .whl and this script installs it into /tmp/site.
# Prints, in order: the bf16 GEMM ceiling, the SDPA kernel, host syncs per micro step, the MoE layers vs the
# dense MLP they replace and an expert-sized MLP, the train step (ms, img/s, MFU of the ceiling), the loader's
# img/s per worker vs the step's demand, embedding + scoring 10k x 10k, then every ds_configs/*.json and the
# paper recipe for 3 steps each.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -d .whl ] && ! $PY -c "import deepspeed, webdataset, wids" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing .whl/ failed"; exit 2; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
echo "== $(date -u +%F) $($PY -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU", "torch", torch.__version__)') x $NGPU"
[ "$NGPU" -ge 1 ] || { echo "error: no CUDA device"; exit 2; }
fail=0
step() {   # step NAME SECONDS CMD...: run with a time limit, keep the log, print its last lines
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  grep -v -e '^\[20' -e 'Warning' -e '^W[0-9]' "$OUT/$name.log" | tail -${TAIL:-12}
  echo "-- $name: exit $rc, $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || fail=1
}

step ceiling 60 $PY bench/gpu_probe.py ceiling
CEIL=$(grep -o 'CEILING_TFLOPS=[0-9.]*' "$OUT/ceiling.log" | cut -d= -f2)
step sdpa 60 $PY bench/gpu_probe.py sdpa
step syncs 120 $PY bench/gpu_probe.py syncs
step moe 120 $PY bench/moe.py --device cuda --dtype bf16 --experts 6 --warmup 5 --repeat 50
step train_step 120 $PY bench/train_step.py --device cuda --preset base --batch 64 --dtype bf16 \
  --steps 20 --warmup 5 ${CEIL:+--peak-tflops $CEIL}
DEMAND=$(grep '^deepspeed' "$OUT/train_step.log" | awk '{print $3}')
TAIL=14 step loader 150 $PY bench/loader.py --workers 1 2 4 8 --repeats 1 --batches 8 --batch 64 --instances 4
echo "loader demand: the train step consumes ${DEMAND:-?} triplets/s; the stream rows above give triplets/s per worker count"
step embed 120 $PY bench/gpu_probe.py embed

# every DeepSpeed config and the paper recipe train 3 steps and evaluate (fp16 included: CPU refuses it)
DATA=$OUT/data
$PY shards/synth.py --layout rgbnt201 --out "$DATA/raw" --ids 40 --cams 3 --per-cam 3 --seed 0 >/dev/null
$PY shards/build.py --dataset rgbnt201 --root "$DATA/raw" --out "$DATA/shards" --maxcount 64 >/dev/null
for ds in ds_configs/*.json; do
  name=$(basename "$ds" .json)
  TAIL=2 step "config_$name" 120 deepspeed --num_gpus "$NGPU" launch/train.py --config configs/demo.yaml \
    --deepspeed_config "$ds" model.frm.ep_size=1 data.shards="$DATA/shards" train.out_dir="$OUT/run_$name" \
    model.img_size=[128,64] train.global_batch=32 train.epochs=1 train.steps_per_epoch=3 train.eval_first=false \
    train.eval_missing=false train.log_every=1 tracking.enabled=false
done
TAIL=2 step paper_recipe 150 deepspeed --num_gpus "$NGPU" launch/train.py --config configs/rgbnt201.yaml \
  model.pretrained=none data.shards="$DATA/shards" train.out_dir="$OUT/run_paper" train.epochs=1 \
  train.steps_per_epoch=3 train.eval_missing=false train.log_every=1 tracking.enabled=false
if [ "$NGPU" -ge 2 ]; then
  step gather 120 deepspeed --num_gpus "$NGPU" bench/gather.py --preset base --img 256 128 --micro 8 --dtype bf16
fi
echo "== gpu_check: $([ $fail -eq 0 ] && echo all steps ran || echo SOME STEPS FAILED)"
exit $fail
