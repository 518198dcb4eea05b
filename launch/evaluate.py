"""Evaluate a checkpoint: mAP and CMC with the dataset's protocol, optionally the six missing-modality settings.

    python launch/evaluate.py --checkpoint runs/rgbnt201 --shards data/shards/rgbnt201 [--missing all] [key=value ...]
    deepspeed --num_gpus 2 launch/evaluate.py --checkpoint ... --shards ...     # feature extraction split over ranks

Every setting comes from the experiment config stored in the checkpoint (data.eval_batch, data.re_ranking,
data.max_damaged_share, data.num_workers, train.deepspeed_config, ...); dotted `key=value` arguments override
it, e.g. `data.eval_batch=16 data.re_ranking=true`. --re-ranking, --max-damaged-share and --deepspeed_config
are shorthands for data.re_ranking=true, data.max_damaged_share=X and train.deepspeed_config=PATH; --batch N
(deprecated) for data.eval_batch=N. The engine is the run's: its DeepSpeed JSON (precision, ZeRO stage).

The model is rebuilt from that config on any number of processes: where the
checkpoint's ep_size does not divide the world (an ep_size 2 checkpoint evaluated in one process), the experts are
re-sharded as `--resume` does (expert files are keyed by global expert index) and the table is the same.

Damaged samples (a shard cut short, a corrupt member) are left out and counted: the table and --json report
`damaged_query` / `damaged_gallery`; more than data.max_damaged_share of a split damaged is an error (exit 2)
naming the shards that hold them.
"""
import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace

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


def _parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="run folder, its checkpoints/ folder, or one tag folder")
    ap.add_argument("--shards", required=True, help="shard folder (with manifest.json) to evaluate on, or the "
                    "same files as an http(s):// URL or a pipe: command with {name} (docs/MULTINODE.md)")
    ap.add_argument("--missing", default="", help="'all' for full + the six missing-modality settings, "
                    "or one setting: r, n, t, rn, rt, nt")
    ap.add_argument("--best", action="store_true", help="use the best-mAP checkpoint rather than the latest")
    ap.add_argument("--re-ranking", action="store_true", help="k-reciprocal re-ranking of the distances (Zhong et "
                    "al., CVPR 2017; k1=50, k2=15, lambda=0.3 as the reference evaluator), the reference codes' "
                    "TEST.RE_RANKING: data.re_ranking=true")
    ap.add_argument("--batch", type=int, default=None, help="deprecated: data.eval_batch=N (batch per rank)")
    ap.add_argument("--max-damaged-share", type=float, default=None, help="data.max_damaged_share=X: fail when "
                    "more than this share of the query or the gallery is damaged; damaged samples under it are "
                    "left out of the scores and counted")
    ap.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                    help="train.deepspeed_config=PATH (default: the checkpoint's)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--save-embeddings", default=None, help="write query embeddings (+ ids) to this .pt file")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides of the checkpoint's config, e.g. "
                    "data.eval_batch=16 data.num_workers=4")
    return ap.parse_args(argv)


def _overrides(args) -> list[str]:
    """The shorthand flags as the config keys they stand for, then the explicit overrides (which win)."""
    out = []
    if args.batch is not None:
        if os.environ.get("RANK", "0") == "0":
            print(f"warning: --batch is deprecated; pass data.eval_batch={args.batch}", file=sys.stderr)
        out.append(f"data.eval_batch={args.batch}")
    if args.re_ranking:
        out.append("data.re_ranking=true")
    if args.max_damaged_share is not None:
        out.append(f"data.max_damaged_share={args.max_damaged_share}")
    return out + list(args.overrides)


def _engine(config, ckpt_dir, tag: str, info):
    """The run's DeepSpeed engine (its JSON: precision, ZeRO stage) holding the checkpoint's weights."""
    from mfrnet_ds.engine import dist as D
    from mfrnet_ds.engine.build import build_engine
    from mfrnet_ds.model import build_model

    model = D.place_experts(build_model(config), config.train.seed, info.rank)
    engine = build_engine(model, config, info, D.deepspeed_config(config, info.world_size), total_steps=None)
    engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=False, load_lr_scheduler_states=False)
    return engine


def main(argv=None) -> int:
    args = _parse(argv)

    from mfrnet_ds.engine import ckpt
    from mfrnet_ds.engine import dist as D
    from mfrnet_ds.eval.embed import DamagedSplitError, evaluate_settings, extract, format_table
    from mfrnet_ds.eval.health import collapse_warning
    from mfrnet_ds.eval.pixel import pixel_baseline
    from mfrnet_ds.model import MISSING_SETTINGS
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
    try:
        config = config_from_saved(client["config"], _overrides(args))
    except ConfigError as e:
        return _error(e, info.is_main)
    if args.deepspeed_config:
        config = replace(config, train=replace(config.train, deepspeed_config=args.deepspeed_config))
    config, resharded = fit_expert_parallel(config, info.world_size)
    if resharded and info.is_main:
        print(f"checkpoint {ckpt_dir / tag} on {info.world_size} process(es): experts re-sharded "
              f"({', '.join(resharded)})", file=sys.stderr)
    try:
        check(config, info.world_size)
    except ConfigError as e:
        return _error(f"checkpoint {ckpt_dir / tag}: {e}", info.is_main)
    try:
        engine = _engine(config, ckpt_dir, tag, info)
    except UserError as e:
        return _error(e, info.is_main)
    data = config.data
    kw = dict(img_size=config.model.img_size, batch_size=data.eval_batch, rank=info.rank, world_size=info.world_size,
              device=info.device, num_workers=data.num_workers, progress=info.is_main, dtype=D.engine_dtype(engine))
    try:
        results = evaluate_settings(engine, args.shards, manifest, settings, re_ranking=data.re_ranking,
                                    max_damaged_share=data.max_damaged_share, **kw)
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
              + (" | k-reciprocal re-ranking" if data.re_ranking else ""))
        pixel = pixel_baseline(args.shards, manifest, config.model.img_size, batch_size=data.eval_batch,
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
