#!/usr/bin/env bash
# Screenshots of the MLflow UI for docs/TRACKING.md and the README, taken with headless Chromium:
#   docs/img/mlflow_runs.png      the runs table (the link the README gives)
#   docs/img/mlflow_run.png       one run's page (description, tags, datasets, logged model)
#   docs/img/mlflow_compare.png   the compare page of the two runs
#
#   bash docs/screenshots.sh [WORK_DIR]      # by hand; CI does not run it (needs Debian's `chromium`)
#
# Trains two tiny runs (4 and 2 FRM experts, ~1 min each on 2 CPU cores) on tiny synthetic shards into one
# store in WORK_DIR (default /tmp/mfrnet_screenshots), starts `python -m mfrnet_ds.tracking.ui` over it
# and photographs the pages. Needs: the project's venv active, `apt-get install -y chromium`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/mfrnet_screenshots}
PORT=${PORT:-5791}
IMG=$ROOT/docs/img
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
command -v chromium >/dev/null || { echo "error: chromium not found: apt-get install -y chromium" >&2; exit 2; }
OUT=$WORK/run
mkdir -p "$IMG"
if [ -z "${REUSE:-}" ]; then   # REUSE=1: photograph the runs already in WORK_DIR
rm -rf "$WORK" && mkdir -p "$WORK"

python - "$WORK" <<'EOF'
import sys
from mfrnet_ds.shards import build
from mfrnet_ds.synth import make_tree
make_tree("rgbnt201", f"{sys.argv[1]}/raw", ids=16, cams=2, per_cam=2, seed=3)
build("rgbnt201", f"{sys.argv[1]}/raw", f"{sys.argv[1]}/shards", maxcount=64)
EOF

train() {  # one tiny run into $OUT's store; its own out_dir so checkpoints do not mix
    python "$ROOT/launch/train.py" --config "$ROOT/configs/demo.yaml" data.shards="$WORK/shards" \
        train.out_dir="$WORK/$1" tracking.uri="sqlite:///$OUT/mlflow.db" model.img_size=[64,32] \
        train.global_batch=16 data.num_instances=4 model.frm.ep_size=1 data.num_workers=0 train.log_every=1 \
        train.eval_every=1 train.epochs=3 tracking.system_metrics_interval=1 "${@:2}" > "$WORK/$1.log" 2>&1
}
mkdir -p "$OUT"
train run "model.frm.num_experts=4"
train run_e2 "model.frm.num_experts=2" "model.frm.top_k=1"
fi

# its own session, so that stopping it stops the server's workers too; no background job runner needed
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid python -m mfrnet_ds.tracking.ui "$OUT" --port "$PORT" \
    > "$WORK/ui.log" 2>&1 &
UI=$!
trap 'kill -- -$UI 2>/dev/null; wait $UI 2>/dev/null || true' EXIT
for _ in $(seq 90); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done

URLS=$(python -c '
import sys
from mlflow.tracking import MlflowClient
from mfrnet_ds.tracking.ui import compare_url, run_url, runs_url
base = f"http://127.0.0.1:{sys.argv[2]}"
client = MlflowClient(f"sqlite:///{sys.argv[1]}/mlflow.db")
exp = client.get_experiment_by_name("demo").experiment_id
ids = [r.info.run_id for r in client.search_runs([exp], order_by=["attributes.start_time ASC"])]
print(runs_url(base, exp), run_url(base, exp, ids[0]), compare_url(base, exp, ids))
' "$OUT" "$PORT")
read -r RUNS RUN COMPARE <<< "$URLS"

shot() {  # name url: a 1600x1000 page, rendered with 15 s of virtual time for the React UI to load
    # (the run's "Model metrics" charts stay blank in headless Chromium, so they are not photographed)
    chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --virtual-time-budget=15000 \
        --window-size=1600,1000 --screenshot="$IMG/$1" "$2" >/dev/null 2>&1
    python -c "from PIL import Image; im = Image.open('$IMG/$1'); \
im.convert('P', palette=Image.ADAPTIVE, colors=128).save('$IMG/$1', optimize=True)"
    echo "$IMG/$1 <- $2 ($(du -k "$IMG/$1" | cut -f1) KB)"
}
shot mlflow_runs.png "$RUNS"
shot mlflow_run.png "$RUN"
shot mlflow_compare.png "$COMPARE"
