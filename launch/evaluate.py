"""Evaluate a checkpoint: mAP and CMC with the dataset's protocol, optionally the six missing-modality settings.

    python launch/evaluate.py --checkpoint runs/rgbnt201 --shards data/shards/rgbnt201 [--missing all] [--re-ranking]
    deepspeed --num_gpus 2 launch/evaluate.py --checkpoint ... --shards ...     # feature extraction split over ranks

The model is rebuilt from the experiment config stored in the checkpoint, on any number of processes: where the
checkpoint's ep_size does not divide the world (an ep_size 2 checkpoint evaluated in one process), the experts are
re-sharded as `--resume` does (expert files are keyed by global expert index) and the table is the same.

Damaged samples (a shard cut short, a corrupt member) are left out and counted: the table and --json report
`damaged_query` / `damaged_gallery`; more than --max-damaged-share (default: the checkpoint's
data.max_damaged_share) of a split damaged is an error (exit 2) naming the shards that hold them.
"""
import argparse
import json
import logging
import os
import sys
import time

import torch

from mfrnet_ds.config import ConfigError, UserError, check, config_from_saved, fit_expert_parallel


def _error(message, is_main: bool | None = None) -> int:
    """A user error every rank meets alike: one `error:` line from rank 0, no traceback; exit status 2."""
    if is_main is None:           # before init_distributed: the launcher's RANK
        is_main = os.environ.get("RANK", "0") == "0"
    if is_main:
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(3)   # let rank 0 print it: a launcher stops every rank as soon as one exits
    return 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="run folder, its checkpoints/ folder, or one tag folder")
    ap.add_argument("--shards", required=True, help="shard folder (with manifest.json) to evaluate on, or the "
                    "same files as an http(s):// URL or a pipe: command with {name} (docs/MULTINODE.md)")
    ap.add_argument("--missing", default="", help="'all' for full + the six missing-modality settings, "
                    "or one setting: r, n, t, rn, rt, nt")
    ap.add_argument("--best", action="store_true", help="use the best-mAP checkpoint rather than the latest")
    ap.add_argument("--re-ranking", action="store_true", help="k-reciprocal re-ranking of the distances (Zhong et "
                    "al., CVPR 2017; k1=50, k2=15, lambda=0.3 as the reference evaluator), the reference codes' TEST.RE_RANKING")
    ap.add_argument("--batch", type=int, default=64, help="evaluation batch per rank")
    ap.add_argument("--max-damaged-share", type=float, default=None, help="fail when more than this share of "
                    "the query or the gallery is damaged (default: data.max_damaged_share of the checkpoint's "
                    "config); damaged samples under it are left out of the scores and counted")
    ap.add_argument("--deepspeed_config", "--deepspeed-config", default="ds_configs/cpu.json")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--save-embeddings", default=None, help="write query embeddings (+ ids) to this .pt file")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = ap.parse_args(argv)

    from mfrnet_ds.engine import ckpt
    from mfrnet_ds.engine import dist as D
    from mfrnet_ds.eval.embed import DamagedSplitError, evaluate_settings, extract, format_table
    from mfrnet_ds.eval.health import collapse_warning
    from mfrnet_ds.eval.pixel import pixel_baseline
    from mfrnet_ds.model import MISSING_SETTINGS, build_model
    from mfrnet_ds.stream.pipeline import read_manifest

    settings = [""] + list(MISSING_SETTINGS) if args.missing == "all" else [args.missing]
    if args.missing not in ("", "all") and args.missing not in MISSING_SETTINGS:
        return _error(f"--missing={args.missing!r}: expected all, {', '.join(MISSING_SETTINGS)}")
    try:
        ckpt_dir, tag = ckpt.resolve(args.checkpoint, best=args.best)
        manifest = read_manifest(args.shards)
    except UserError as e:
        return _error(e)

    info = D.init_distributed(args.local_rank)
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING, format="%(message)s")
    client = ckpt.read_model_states(ckpt_dir / tag)
    config, resharded = fit_expert_parallel(config_from_saved(client["config"]), info.world_size)
    if resharded and info.is_main:
        print(f"checkpoint {ckpt_dir / tag} on {info.world_size} process(es): experts re-sharded "
              f"({', '.join(resharded)})", file=sys.stderr)
    try:
        check(config, info.world_size)
    except ConfigError as e:
        return _error(f"checkpoint {ckpt_dir / tag}: {e}", info.is_main)
    try:
        # pretrained weights, when the run's config names them
        model = D.place_experts(build_model(config), config.train.seed, info.rank)
        ds_config = D.deepspeed_config(config, info.world_size, args.deepspeed_config)
    except UserError as e:
        return _error(e, info.is_main)
    engine = D.initialize(model, None, None, ds_config, info)
    engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=False, load_lr_scheduler_states=False)
    kw = dict(img_size=config.model.img_size, batch_size=args.batch, rank=info.rank, world_size=info.world_size,
              device=info.device, num_workers=config.data.num_workers, progress=info.is_main,
              dtype=D.engine_dtype(engine))
    limit = config.data.max_damaged_share if args.max_damaged_share is None else args.max_damaged_share
    try:
        results = evaluate_settings(engine, args.shards, manifest, settings, re_ranking=args.re_ranking,
                                    max_damaged_share=limit, **kw)
    except DamagedSplitError as e:   # raised on every rank alike
        if info.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if args.save_embeddings:
        query = extract(engine, args.shards, "query", **kw)
        if info.is_main:
            torch.save(query, args.save_embeddings)
    if info.is_main:
        print(f"{manifest['dataset']} | checkpoint {ckpt_dir / tag} | step {client.get('step')}"
              + (" | k-reciprocal re-ranking" if args.re_ranking else ""))
        pixel = pixel_baseline(args.shards, manifest, config.model.img_size, batch_size=args.batch,
                               num_workers=config.data.num_workers)
        print(format_table(results, pixel))
        warning = collapse_warning(results[""]) if "" in results else None
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
