"""Raw dataset tree -> WebDataset shards + manifest.json (see mfrnet_ds/shards.py for the format).

    python shards/build.py --dataset rgbnt201 --root RGBNT201 --out shards/rgbnt201 [--workers 4]

Exit codes: 0 built (inputs skipped under --on-error skip are listed on stderr and in the
manifest), 1 bad input under --on-error fail, 2 the root is not the dataset's layout or bad arguments.
"""
from __future__ import annotations

import argparse
import sys

from mfrnet_ds.raw import READERS, LayoutError
from mfrnet_ds.shards import DEFAULT_MAXCOUNT, BuildError, build


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=sorted(READERS))
    parser.add_argument("--root", required=True, help="the raw tree as distributed")
    parser.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    parser.add_argument("--maxcount", type=int, default=DEFAULT_MAXCOUNT, help="samples per shard at most")
    parser.add_argument("--workers", type=int, default=1, help="parallel shard writers")
    parser.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                        help="bad input (missing modality, unreadable image, unparseable name)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    def report(problem):
        kind = "error" if args.on_error == "fail" else "skipped"
        print(f"{kind}: {problem.source}: {problem.reason}", file=sys.stderr)

    try:
        manifest = build(args.dataset, args.root, args.out, maxcount=args.maxcount, workers=args.workers,
                         on_error=args.on_error, progress=not args.quiet, report=report)
    except LayoutError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    except BuildError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 1
    except ValueError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{s} {v['num_samples']} samples / {v['num_ids']} ids" for s, v in manifest["splits"].items())
    print(f"{args.out}: {manifest['dataset']}: {counts}; {manifest['num_cameras']} cameras; "
          f"{len(manifest['skipped'])} skipped, {manifest['junk_skipped']} junk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
