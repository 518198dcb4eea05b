"""What an MLflow user expects on a run besides numbers: MLflow's standard tags, a description, a
name that keeps the distinguishing parts first, and the shard manifest as a dataset input.

    tags = standard_tags(config, manifest, world_size)   # mlflow.user, mlflow.source.*, mlflow.note.content
    name = run_name(config, world_size)                  # "frm4-cosine-top2 EP1 W1 demo-tiny 1130-081000"
    tracker.online("dataset inputs", lambda client, run_id: log_datasets(client, run_id, manifest, shards))
"""
from __future__ import annotations

import getpass
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_BRANCH,
    MLFLOW_GIT_COMMIT,
    MLFLOW_GIT_DIRTY,
    MLFLOW_GIT_REPO_URL,
    MLFLOW_RUN_NOTE,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)

_REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=_REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_tags() -> dict[str, str]:
    """MLflow's own git tags of the code that trains (empty outside a git checkout)."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {}
    tags = {MLFLOW_GIT_COMMIT: commit, MLFLOW_GIT_BRANCH: _git("rev-parse", "--abbrev-ref", "HEAD"),
            MLFLOW_GIT_DIRTY: str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()}
    remote = _git("config", "--get", "remote.origin.url")
    if remote:
        tags[MLFLOW_GIT_REPO_URL] = remote
    return tags


def description(config, manifest: dict, world_size: int) -> str:
    """The run description (`mlflow.note.content`, markdown) made from the config."""
    m = config.model
    splits = manifest.get("splits", {})
    counts = ", ".join(f"{k} {v.get('num_samples', '?')}" for k, v in splits.items())
    synthetic = " **synthetic** (mfrnet_ds.synth)" if manifest.get("synthetic") else ""
    return (f"**{config.name}**: preset `{m.preset}`, image {m.img_size[0]}x{m.img_size[1]}, "
            f"FRM {m.frm.num_experts} experts ({m.frm.router}, top-{m.frm.top_k}, expert-parallel size "
            f"{m.frm.ep_size}), FFM {m.ffm.num_experts} experts; world size {world_size}; "
            f"{config.train.epochs} epochs, global batch {config.train.global_batch}.\n\n"
            f"Data: `{manifest.get('dataset', '?')}`{synthetic} from `{config.data.shards}` ({counts}; "
            f"{manifest.get('num_classes', '?')} training ids, {manifest.get('num_cameras', '?')} cameras).")


def experiment_description(experiment: str, dataset: str) -> str:
    return (f"`{experiment}`: MFRNet runs on `{dataset}` (mfrnet-ds). Metrics: `eval/` (mAP and CMC as "
            "fractions), `train/` (losses, lr), `moe/<layer>/` (expert shares). Compare runs: tick them in the runs table, "
            "press Compare; or `python -m mfrnet_ds.compare`.")


def standard_tags(config, manifest: dict, world_size: int) -> dict[str, str]:
    """Tags the MLflow UI shows in its own columns (user, source, git commit, description) and ours."""
    tags = {MLFLOW_USER: getpass.getuser(), MLFLOW_SOURCE_TYPE: "LOCAL",
            MLFLOW_SOURCE_NAME: Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "mfrnet_ds",
            MLFLOW_RUN_NOTE: description(config, manifest, world_size),
            "preset": config.model.preset, "dataset": manifest["dataset"],
            "synthetic": str(bool(manifest.get("synthetic"))).lower()}
    tags.update(git_tags())
    return tags


def run_name(config, world_size: int) -> str:
    """What differs between runs of one experiment first, every part labelled - `frm4-cosine-top2` (FRM
    experts, router, top-k), `EP2` the expert-parallel size and `W2` the world size (never "2 epochs") -
    then the recipe and preset, the start time last: a name cut short in the runs table still tells runs
    apart."""
    m = config.model
    return (f"frm{m.frm.num_experts}-{m.frm.router}-top{m.frm.top_k} EP{m.frm.ep_size} W{world_size} "
            f"{config.name}-{m.preset} {time.strftime('%m%d-%H%M%S')}")


# ---------------------------------------------------------------- dataset inputs

def manifest_digest(manifest: dict) -> str:
    """A fingerprint of the shard set: the manifest's content (shard names and counts), not its path."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def shard_datasets(manifest: dict, shards: str):
    """One mlflow MetaDataset per split, named `<dataset>/<split>`, with the split's counts as profile."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    class ShardSplit(MetaDataset):
        def __init__(self, source, name, digest, profile):
            self._profile = profile
            super().__init__(source, name=name, digest=digest)

        @property
        def profile(self):
            return self._profile

        def to_dict(self):   # MLflow's base class leaves the profile out of what it stores
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    source = LocalArtifactDatasetSource(str(Path(shards).resolve() / "manifest.json"))
    digest = manifest_digest(manifest)
    out = []
    for split, info in manifest.get("splits", {}).items():
        profile = {"num_samples": info.get("num_samples"), "num_ids": info.get("num_ids"),
                   "num_shards": len(info.get("shards", [])), "synthetic": bool(manifest.get("synthetic")),
                   "format": manifest.get("format"), "num_cameras": manifest.get("num_cameras")}
        out.append((split, ShardSplit(source, f"{manifest['dataset']}/{split}", digest, profile)))
    return out


def log_datasets(client, run_id: str, manifest: dict, shards: str) -> int:
    """Log every split of the shard set as a dataset input of the run (context: train or eval)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [DatasetInput(ds._to_mlflow_entity(),
                           [InputTag(MLFLOW_DATASET_CONTEXT, "train" if split == "train" else "eval"),
                            InputTag("synthetic", str(bool(manifest.get("synthetic"))).lower())])
              for split, ds in shard_datasets(manifest, shards)]
    client.log_inputs(run_id, datasets=inputs)
    return len(inputs)
