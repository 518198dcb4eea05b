"""Train MFRNet with DeepSpeed.

    deepspeed [--num_gpus N | --hostfile F] launch/train.py --config configs/rgbnt201.yaml \\
        [--deepspeed_config ds_configs/zero2.json] [--resume] [key=value ...]
    python launch/train.py --config configs/demo.yaml      # one process

CPU machines run the same code on DeepSpeed's CPU accelerator (gloo); GPUs use NCCL.
"""
import argparse
import logging
import sys

from mfrnet_ds import ConfigError, load_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    ap.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                    help="DeepSpeed JSON (default: train.deepspeed_config of the experiment)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoints/latest")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.frm.num_experts=8")
    args = ap.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from mfrnet_ds.engine import dist as D
    from mfrnet_ds.engine.loop import train

    info = D.init_distributed(args.local_rank, timeout_s=config.train.collective_timeout_s)
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {info.rank}] %(message)s", datefmt="%H:%M:%S")
    try:
        train(config, info, resume=args.resume, ds_config_path=args.deepspeed_config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
