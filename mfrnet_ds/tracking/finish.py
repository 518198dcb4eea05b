"""End of a training run on rank 0: files a person looks at, logged as MLflow artifacts."""
from __future__ import annotations

from pathlib import Path


def finalize_run(tracker, *, out_dir: Path, ckpt_dir: Path, shards: str, manifest: dict, config) -> None:
    for name in ("config.json", "deepspeed.json", "metrics.json", "metrics_untrained.json", "train_log.jsonl"):
        if (out_dir / name).is_file():
            tracker.log_artifact(out_dir / name)
