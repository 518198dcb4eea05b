"""Train MFRNet with DeepSpeed.

    deepspeed [--num_gpus N | --hostfile F] launch/train.py --config configs/rgbnt201.yaml \\
        [--deepspeed_config ds_configs/zero2.json] [--resume] [key=value ...]
    python launch/train.py --config configs/demo.yaml      # one process

CPU machines run the same code on DeepSpeed's CPU accelerator (gloo); GPUs use NCCL.

Exit status: 0 done (or stopped by train.max_steps, with a checkpoint and, with train.eval_on_stop, the final
evaluation); 2 a user error before training (a setting, missing shards or manifest, DeepSpeed JSON, pretrained
weights, nothing to --resume): one `error: <message>` line from rank 0, no traceback; 128 + N stopped by
signal N (SIGTERM 143, SIGINT 130) at a step boundary after saving a checkpoint: `--resume` continues it;
1 (with a traceback) anything else.
"""
import argparse
import logging
import os
import sys
import time
from dataclasses import replace

from mfrnet_ds.config import ConfigError, UserError, load_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    ap.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                    help="DeepSpeed JSON: sets train.deepspeed_config (default: the experiment's)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoints/latest")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.frm.num_experts=8")
    args = ap.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:      # every rank has the same arguments: rank 0 says it
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:
            time.sleep(3)         # let rank 0 print it: a launcher stops every rank as soon as one exits
        return 2
    if args.deepspeed_config:
        # into the config, not beside it: the checkpoint then records the JSON the run used (launch/evaluate.py)
        config = replace(config, train=replace(config.train, deepspeed_config=args.deepspeed_config))

    from mfrnet_ds.engine import dist as D
    from mfrnet_ds.trainer import SetupError, StoppedBySignal, train
    from mfrnet_ds.engine.step import NonFiniteLoss

    info = D.init_distributed(args.local_rank, timeout_s=config.train.collective_timeout_s)
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {info.rank}] %(message)s", datefmt="%H:%M:%S")
    try:
        train(config, info, resume=args.resume)
    except SetupError as e:       # raised on every rank at the same point
        if info.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        D.agree_max(0)   # a barrier: no rank exits (and has the launcher stop rank 0) before it printed
        return 2
    except UserError as e:        # met by this rank during training
        print(f"error: rank {info.rank}: {e}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLoss as e:    # raised on every rank at the same step boundary, before any checkpoint of it
        if info.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        D.agree_max(0)
        return 1
    except StoppedBySignal as e:  # checkpoint saved (rank 0 logged where): --resume continues the run
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
