"""Write a synthetic raw tree in one of the real layouts (see mfrnet_ds/synth.py for what it draws).

    python shards/synth.py --layout rgbnt201 --out RAW [--ids 24] [--cams 4] [--per-cam 4] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
import time

from mfrnet_ds.synth import LAYOUTS, make_tree


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", required=True, choices=LAYOUTS)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ids", type=int, default=24, help="identities in all")
    parser.add_argument("--cams", type=int, default=4, help="cameras")
    parser.add_argument("--per-cam", type=int, default=4, help="images per identity and camera")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-ids", type=int, default=None, help="test identities (default: half)")
    parser.add_argument("--scenes", type=int, default=2, help="msvr310: scenes per identity")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summary = make_tree(args.layout, args.out, ids=args.ids, cams=args.cams, per_cam=args.per_cam,
                            seed=args.seed, test_ids=args.test_ids, scenes=args.scenes)
    except ValueError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    print(f"{args.out}: {args.layout}: train {summary['train']}, query {summary['query']}, "
          f"gallery {summary['gallery']} samples; {len(summary['train_ids'])} train ids, "
          f"{len(summary['test_ids'])} test ids ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
