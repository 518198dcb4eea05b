#!/usr/bin/env bash
# The embedded demo (README command 1): synthetic RGBNT201-layout data -> WebDataset shards -> MFRNet trained
# with DeepSpeed on this machine's devices -> evaluated before and after -> tracked in a local MLflow store.
# Runs from the repository root with the project's python and deepspeed on PATH (`make demo` does that).
# DEMO_OUT (default demo_out), DEMO_NPROC and DEMO_DS override the output folder, process count and DeepSpeed JSON.
set -euo pipefail
OUT=${DEMO_OUT:-demo_out}
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 1 ]; then
  NPROC=$NGPU; DS=ds_configs/bf16.json
else
  NPROC=2; DS=ds_configs/cpu.json          # two CPU processes (gloo), as two GPUs would be
fi
NPROC=${DEMO_NPROC:-$NPROC}                 # e.g. DEMO_NPROC=1: the same training in one process
DS=${DEMO_DS:-$DS}                          # e.g. DEMO_DS=ds_configs/bf16.json on a CPU
EP=2; if [ $((NPROC % 2)) -ne 0 ]; then EP=1; fi   # FRM experts split over 2 ranks where the world allows

rm -rf "$OUT"
echo "== 1/4 synthetic raw tree (RGBNT201 layout) -> $OUT/raw"
python shards/synth.py --layout rgbnt201 --out "$OUT/raw" --ids 60 --cams 4 --per-cam 3 --seed 0
echo "== 2/4 WebDataset shards -> $OUT/shards"
python shards/build.py --dataset rgbnt201 --root "$OUT/raw" --out "$OUT/shards" --workers 2 --maxcount 64
echo "== 3/4 training on $NPROC process(es), FRM ep_size $EP, $DS"
PORT=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
# DeepSpeed's CPU all-reduce leaves two shared-memory segments per run; remove ours when done
trap 'rm -f /dev/shm/deepspeed_allreduce_buffer_$(id -u)_127.0.0.1_${PORT}_*' EXIT
deepspeed --num_gpus "$NPROC" --master_port "$PORT" launch/train.py --config configs/demo.yaml --deepspeed_config "$DS" \
  model.frm.ep_size="$EP" data.shards="$OUT/shards" train.out_dir="$OUT/run" tracking.uri="sqlite:///$(realpath -m "$OUT")/mlflow.db"
echo "== 4/4 results"
python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
before = json.loads((out / "run/metrics_untrained.json").read_text())
after = json.loads((out / "run/metrics.json").read_text())
pixel = {k: after[f"pixel_{k}"] for k in ("mAP", "R1", "R5", "R10")}
print(f"{'':<16}{'mAP':>8}{'R1':>8}{'R5':>8}{'R10':>8}")
for name, m in (("untrained", before), ("pixel matching", pixel), ("trained", after)):
    print(f"{name:<16}" + "".join(f"{m[k]:>8.2f}" for k in ("mAP", "R1", "R5", "R10")))
print(f"trained / pixel matching mAP: {after['mAP'] / max(pixel['mAP'], 1e-9):.1f}x")
for name, m in (("untrained", before), ("trained", after)):
    print(f"{name} embedding: mean pairwise cosine {m['mean_cosine']:.3f}, effective rank "
          f"{m['effective_rank']:.1f} of {m['embedding_dim']:.0f}, nearest gallery neighbour from the query's "
          f"camera {100 * m['same_camera_nn']:.0f}%")
print(f"\ncheckpoints: {out / 'run/checkpoints'} (latest, best)")
print(f"MLflow store: sqlite:///{(out / 'mlflow.db').resolve()}")
print(f"  python -m mfrnet_ds.tracking.ui {out} --port 5000     # then open the runs table:")
print("  http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning")
print(f"  python -m mfrnet_ds.compare --experiment demo --uri sqlite:///{(out / 'mlflow.db').resolve()} --out {out / 'compare'}")
PY
