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

# the library functions live with the checkpoints they read; this module is their command line
from mfrnet_ds.engine.ckpt import export, load_exported

__all__ = ["export", "load_exported", "main"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="run folder, its checkpoints/ folder, or one tag folder")
    ap.add_argument("out", help="output .pt file")
    ap.add_argument("--best", action="store_true", help="export the best-mAP checkpoint instead of the latest")
    args = ap.parse_args(argv)
    try:
        print(f"wrote {export(args.checkpoint, args.out, use_best=args.best)}")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
