"""`python -m mfrnet_ds.summary --config FILE [key=value ...]`: parameters per component, total vs active
per token, and GFLOPs per triplet (one forward of one RGB/NIR/TIR sample in eval mode)."""
from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from mfrnet_ds import ConfigError, build_model, load_config


def component(name: str) -> str:
    if name.startswith("ffm."):
        return "FFM (generation experts)"
    if ".moe." in name:
        return "FRM (representation experts)"
    if name.startswith(("necks.", "reductions.")):
        return "heads (BNNeck, classifier, reductions)"
    return "backbone (ViT, projection, SIE)"


def summarize(config) -> dict:
    model = build_model(config).eval()
    rows: dict[str, list[int]] = {}           # component -> [total, active per token]
    # A token runs through top_k of a layer's experts: that fraction of the expert weights is active.
    expert_ratio = {}
    for prefix, layer in model.named_modules():
        if layer in model.moe_layers:
            for n, _ in layer.named_parameters(prefix=prefix):
                if ".deepspeed_experts." in n:
                    expert_ratio[n] = layer.router.k / layer.num_experts
    for name, p in model.named_parameters():
        row = rows.setdefault(component(name), [0, 0])
        row[0] += p.numel()
        row[1] += p.numel() * expert_ratio.get(name, 1.0)
    H, W = config.model.img_size
    x = torch.zeros(1, 3, 3, H, W)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, torch.zeros(1, dtype=torch.long))
    return {"rows": rows, "gflops": counter.get_total_flops() / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", help="experiment YAML (default: built-in defaults)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = ap.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = summarize(config)
    m = config.model
    print(f"MFRNet preset={m.preset} input={m.img_size[0]}x{m.img_size[1]} head={m.head} "
          f"FFM={'on' if m.ffm.enabled else 'off'} ({m.ffm.num_experts} experts x2, top-{m.ffm.top_k}) "
          f"FRM blocks={m.frm.blocks} ({m.frm.num_experts} experts, top-{m.frm.top_k}) classes={m.num_classes}")
    print(f"{'component':<40}{'params':>14}{'active/token':>16}")
    total = [0, 0]
    for name, (n, a) in s["rows"].items():
        print(f"{name:<40}{n:>14,}{int(a):>16,}")
        total[0] += n
        total[1] += a
    print(f"{'total':<40}{total[0]:>14,}{int(total[1]):>16,}")
    # torch's counter takes 2 FLOPs per multiply-add; fvcore, which the paper's table uses, counts one
    print(f"GFLOPs per triplet (forward, 3 images): {s['gflops']:.2f} at 2 FLOPs per multiply-add "
          f"(fvcore convention, as in the paper's table: {s['gflops'] / 2:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
