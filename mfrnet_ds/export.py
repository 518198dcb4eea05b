"""`python -m mfrnet_ds.export CKPT OUT.pt`: one fp32 file for inference in a plain process.

CKPT is a run's checkpoint folder (its `latest` is used), `.../checkpoints/best` style tag folder, or a run
folder. DeepSpeed keeps the non-expert weights in `mp_rank_00_model_states.pt` and each expert in its own
file under its *global* index; this merges them into the ep_size=1 numbering, so the file loads with

    config, model = mfrnet_ds.export.load_exported("OUT.pt")      # or:
    model = mfrnet_ds.build_model(config); model.load_state_dict(torch.load(...)["state_dict"])

Expert parallelism is set back to 1 in the exported config: every expert lives in the one process.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mfrnet_ds.config import config_from_saved
from mfrnet_ds.engine.ckpt import merged_state_dict, resolve

def export(ckpt: str | Path, out: str | Path, use_best: bool = False) -> Path:
    ckpt_dir, tag = resolve(ckpt, best=use_best)
    state, main = merged_state_dict(ckpt_dir / tag)
    if "config" not in main:
        raise ValueError(f"{ckpt_dir / tag}: no experiment config in the checkpoint (not written by mfrnet_ds?)")
    config = main["config"]
    for kind in ("ffm", "frm"):
        config["model"][kind]["ep_size"] = 1
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save({"config": config, "state_dict": state, "source": str(ckpt_dir / tag)}, tmp)
    tmp.replace(out)
    return out


def load_exported(path: str | Path):
    """(Config, MFRNet in eval mode) from an exported file."""
    from mfrnet_ds.model import build_model

    blob = torch.load(path, map_location="cpu", weights_only=True)
    config = config_from_saved(blob["config"])
    model = build_model(config)
    model.load_state_dict(blob["state_dict"])
    return config, model.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="run folder, its checkpoints/ folder, or one tag folder")
    ap.add_argument("out", help="output .pt file")
    ap.add_argument("--best", action="store_true", help="export the best-mAP checkpoint instead of the latest")
    args = ap.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out, use_best=args.best)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
