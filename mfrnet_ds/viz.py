"""The paper's Fig. 3: which FRM expert every token went to, drawn over the three modality images.

    python -m mfrnet_ds.viz experts --checkpoint RUN_DIR|CKPT_DIR|model.pt --shards DIR --out DIR
                                    [--n 8] [--split query] [--layer frm.<i>] [--scale S]

--checkpoint takes a run folder, its checkpoints/ folder or one tag folder (exported to a temporary
fp32 file first), or a file written by `python -m mfrnet_ds.export`. The first 256 valid samples of the
split are routed in evaluation mode, as at test time (top-1, no router noise: training-time shares,
logged as moe/<layer>/expert_<e>_share, can differ - every picture and the chart say so). Their
token counts make the chart, the JSON and, at the end of training, the metric
eval/moe/<layer>/expert_<e>_share; --n of them, spread over identities and cameras, are drawn:

    experts_<k>_pid<P>_cam<C>.png  RGB | NIR | TIR side by side, every patch tinted by the colour of the
                                   expert its token went to (top-1 choice); a token dropped by the
                                   capacity limit leaves its patch untinted. Panel titles name the
                                   expert of the CLS token; the legend gives each expert's share.
    expert_shares.png              per expert, the share of each modality's tokens it received
    expert_shares.json             the token counts behind the chart, per modality and expert, and
                                   `shares`: per expert, its share of all routed tokens

Expert e always has the same colour (`expert_colours`), so pictures of different runs compare.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mfrnet_ds.config import MODALITIES  # noqa: E402
from mfrnet_ds.viz_samples import read_split, spread_samples, take_samples  # noqa: E402,F401 - take_samples: API

PANEL_NAMES = ("RGB", "NIR", "TIR")
TINT_ALPHA = 0.5
MODALITY_COLOURS = ("#c0392b", "#34495e", "#e67e22")  # bar chart only
_PICTURE_NAME = re.compile(r"^experts_\d+_pid-?\d+_cam-?\d+\.png$")

# tab10 and its light tab20 partners without the greys: a grey tint would look like an untinted patch.
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
            "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5")


# ---------------------------------------------------------------- colours and routing

def expert_colours(num_experts: int) -> np.ndarray:
    """(E, 3) uint8, fixed per expert index: the 18-colour palette, then evenly spaced hues."""
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts}: expected >= 1")
    colours = [tuple(int(h[i:i + 2], 16) for i in (1, 3, 5)) for h in _PALETTE[:num_experts]]
    extra = num_experts - len(colours)
    for j in range(extra):
        rgb = matplotlib.colors.hsv_to_rgb((j / extra, 0.85, 0.9 if j % 2 else 0.6))
        colours.append(tuple(int(round(255 * v)) for v in rgb))
    return np.array(colours, dtype=np.uint8)


def frm_layer(model, name: str | None = None):
    """The FRM MoE layer called `name` (e.g. "frm.11"), by default the last one."""
    layers = [m for m in model.moe_layers if m.name.startswith("frm.")]
    if not layers:
        raise ValueError("the model has no FRM layer (model.frm.blocks is empty)")
    if name is None:
        return layers[-1]
    for layer in layers:
        if layer.name == name:
            return layer
    raise ValueError(f"--layer {name!r}: the model's FRM layers are {[m.name for m in layers]}")


@contextmanager
def capture_routes(layer):
    """Per forward of `layer`, the first-choice expert of each of its tokens (-1: dropped), on CPU.

    DeepSpeed's MOELayer calls the router once per forward; its output holds indices (k, tokens)."""
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(output[3][0].detach().to("cpu", torch.int64))

    handle = layer.router.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@dataclass(frozen=True)
class TokenGrid:
    prefix: int                 # CLS (and register) tokens before the patches
    grid: tuple[int, int]       # patches per column and row (h, w)
    patch: tuple[int, int]      # pixels per patch (ph, pw)

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]


def token_grid(model) -> TokenGrid:
    embed = model.vit.patch_embed
    return TokenGrid(int(model.vit.num_prefix_tokens), tuple(int(v) for v in embed.grid_size),
                     tuple(int(v) for v in embed.patch_size))


@torch.no_grad()
def route_tokens(model, images: torch.Tensor, camids: torch.Tensor, layer) -> torch.Tensor:
    """(B, 3, T) int64 expert of every token of `layer` for images (B, 3, C, H, W); -1 = dropped."""
    with capture_routes(layer) as got:
        model(images, camids)
    if len(got) != 1:
        raise RuntimeError(f"layer {layer.name} routed {len(got)} times in one forward; expected once")
    B = images.shape[0]
    routes = got[0]
    if routes.numel() % (3 * B):
        raise RuntimeError(f"layer {layer.name} routed {routes.numel()} tokens, not a multiple of 3 x {B}")
    # the FRM layer sees (3B, T) tokens modality-major: rgb samples, then nir, then tir
    return routes.view(3, B, -1).transpose(0, 1).contiguous()


def token_counts(routes: torch.Tensor | np.ndarray, num_experts: int) -> np.ndarray:
    """(3, E + 1) tokens per modality and expert over a (B, 3, T) route tensor; last column: dropped."""
    r = np.asarray(routes)
    out = np.zeros((3, num_experts + 1), dtype=np.int64)
    for m in range(3):
        flat = r[:, m].reshape(-1)
        out[m, :num_experts] = np.bincount(flat[flat >= 0], minlength=num_experts)[:num_experts]
        out[m, num_experts] = int((flat < 0).sum())
    return out


# ---------------------------------------------------------------- drawing

def denormalise(images: torch.Tensor) -> np.ndarray:
    """(..., C, H, W) normalised with mean 0.5 std 0.5 -> (..., H, W, 3) uint8."""
    x = (images.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1)
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    return (x.movedim(-3, -1) * 255).round().to(torch.uint8).numpy()


def tint(image: np.ndarray, patch_experts: np.ndarray, colours: np.ndarray, patch: tuple[int, int],
         alpha: float = TINT_ALPHA) -> np.ndarray:
    """Blend each patch of (H, W, 3) uint8 with the colour of its expert; -1 leaves it unchanged."""
    H, W = image.shape[:2]
    gh, gw = patch_experts.shape
    ph, pw = patch
    per_pixel = np.full((H, W), -1, dtype=np.int64)
    covered = np.repeat(np.repeat(patch_experts, ph, axis=0), pw, axis=1)[:H, :W]  # (gh*ph, gw*pw)
    per_pixel[:covered.shape[0], :covered.shape[1]] = covered
    out = image.astype(np.float32)
    mask = per_pixel >= 0
    out[mask] = (1 - alpha) * out[mask] + alpha * colours[per_pixel[mask]].astype(np.float32)
    return np.rint(out).astype(np.uint8)


@dataclass(frozen=True)
class Layout:
    """Pixel geometry of one sample picture; `panels` are (left, top, right, bottom) boxes."""
    size: tuple[int, int]                            # (width, height)
    panels: tuple[tuple[int, int, int, int], ...]
    legend_top: int


_MARGIN, _GAP, _LINE, _SWATCH, _ENTRY_W = 8, 6, 16, 12, 96


def default_scale(height: int) -> int:
    """Integer upscaling so that a panel is at least 256 pixels tall (small test images stay legible)."""
    return max(1, math.ceil(256 / height))


def picture_layout(image_hw: tuple[int, int], scale: int, num_experts: int) -> Layout:
    H, W = image_hw[0] * scale, image_hw[1] * scale
    width = 2 * _MARGIN + 3 * W + 2 * _GAP
    top = _MARGIN + 2 * _LINE                       # a header line, then the panel titles
    panels = tuple((_MARGIN + i * (W + _GAP), top, _MARGIN + i * (W + _GAP) + W, top + H) for i in range(3))
    per_row = max(1, (width - 2 * _MARGIN) // _ENTRY_W)
    rows = math.ceil((num_experts + 1) / per_row)   # +1: the "dropped" entry
    legend_top = top + H + _GAP
    return Layout((width, legend_top + rows * _LINE + _MARGIN), panels, legend_top)


def render_sample(images: np.ndarray, routes: np.ndarray, grid: TokenGrid, colours: np.ndarray,
                  header: str = "", scale: int | None = None) -> tuple[Image.Image, Layout]:
    """One picture from (3, H, W, 3) uint8 images and (3, T) routes of one sample."""
    if images.shape[0] != 3 or routes.shape != (3, grid.tokens):
        raise ValueError(f"expected images (3, H, W, 3) and routes (3, {grid.tokens}); got {images.shape} "
                         f"and {tuple(routes.shape)}")
    H, W = images.shape[1:3]
    scale = scale or default_scale(H)
    E = len(colours)
    layout = picture_layout((H, W), scale, E)
    canvas = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=11)
    draw.text((_MARGIN, _MARGIN), header, fill="black", font=font)
    for m, box in enumerate(layout.panels):
        cls = ", ".join(f"e{e}" if e >= 0 else "dropped" for e in routes[m, :grid.prefix])
        patches = routes[m, grid.prefix:].reshape(grid.grid)
        tinted = tint(images[m], patches, colours, grid.patch)
        canvas.paste(Image.fromarray(np.repeat(np.repeat(tinted, scale, axis=0), scale, axis=1)), box[:2])
        draw.text((box[0], box[1] - _LINE + 2), f"{PANEL_NAMES[m]}  cls: {cls}", fill="black", font=font)
    counts = token_counts(routes[None], E).sum(axis=0)
    total = max(1, int(counts.sum()))
    entries = [(tuple(int(c) for c in colours[e]), f"e{e} {100 * counts[e] / total:.0f}%") for e in range(E)]
    entries.append((None, f"dropped {100 * counts[E] / total:.0f}%"))
    per_row = max(1, (layout.size[0] - 2 * _MARGIN) // _ENTRY_W)
    for i, (colour, label) in enumerate(entries):
        x = _MARGIN + (i % per_row) * _ENTRY_W
        y = layout.legend_top + (i // per_row) * _LINE
        draw.rectangle((x, y + 1, x + _SWATCH - 1, y + _SWATCH), fill=colour or "white", outline="black")
        draw.text((x + _SWATCH + 4, y), label, fill="black", font=font)
    return canvas, layout


def plot_shares(counts: np.ndarray, path: Path, layer: str, colours: np.ndarray, num_samples: int,
                split: str = "query") -> Path:
    """Grouped bars: per expert, the percentage of each modality's tokens it received; under each expert
    its share of all routed tokens (the metric eval/moe/<layer>/expert_<e>_share)."""
    E = counts.shape[1] - 1
    show_dropped = counts[:, E].sum() > 0
    columns = E + 1 if show_dropped else E
    shares = 100 * counts[:, :columns] / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    overall = routed_shares(counts)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.0 + 0.9 * columns), 4.4))
    x = np.arange(columns)
    width = 0.8 / 3
    for m, name in enumerate(MODALITIES):
        ax.bar(x + (m - 1) * width, shares[m], width, label=name, color=MODALITY_COLOURS[m])
    ax.set_xticks(x, [f"e{e}\n{100 * overall[e]:.1f}% of all" for e in range(E)]
                  + (["dropped"] if show_dropped else []))
    for e, label in enumerate(ax.get_xticklabels()[:E]):
        label.set_color(colours[e] / 255)  # the tint of the sample pictures
        label.set_fontweight("bold")
    ax.set_ylabel("% of the modality's tokens")
    ax.set_title(f"{layer}: tokens per expert by modality ({num_samples} {split} samples)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.5, 0.01, textwrap.fill(CAPTION.format(layer=layer), 95), ha="center", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- from samples to files

@dataclass
class ExpertPictures:
    pictures: list[Path]
    chart: Path
    summary: Path
    counts: np.ndarray        # (3, E + 1) tokens per modality and expert over all routed samples; last: dropped
    routes: torch.Tensor      # (n, 3, T) of the pictured samples
    shares: list[float]       # per expert, share of all routed tokens (eval/moe/<layer>/expert_<e>_share)
    layer: str


def route_split(model, shards, split: str, img_size, moe, *, limit: int, batch_size: int = 32):
    """(pids, camids, (N, 3, T) routes) of the first `limit` samples of a split, routed in evaluation mode."""
    meta = read_split(shards, split, img_size, stop=limit, batch_size=batch_size)
    device = next(model.parameters()).device
    routes = [route_tokens(model, meta["images"][i:i + batch_size].to(device),
                           meta["camids"][i:i + batch_size].to(device), moe)
              for i in range(0, len(meta["pids"]), batch_size)]
    return meta["pids"], meta["camids"], torch.cat(routes)


def routed_shares(counts: np.ndarray) -> list[float]:
    """Per expert, its share of all routed (not dropped) tokens of the three modalities: the quantity the
    trainer logs as moe/<layer>/expert_<e>_share, here in evaluation mode."""
    routed = counts[:, :-1].sum(axis=0)
    return (routed / max(1, int(routed.sum()))).tolist()


CAPTION = ("Routing in evaluation mode, as at test time: each token's top-1 expert without the router's training "
           "noise; the training metric moe/{layer}/expert_<e>_share, measured with that noise, can differ.")


def expert_pictures(model, shards, out, *, n: int = 8, split: str = "query", layer: str | None = None,
                    img_size=None, scale: int | None = None, progress: bool = True,
                    share_samples: int = 256) -> ExpertPictures:
    """Route up to `share_samples` samples of `split` through `model` in evaluation mode: their token counts
    make the chart, expert_shares.json and `shares` (the metric eval/moe/<layer>/expert_<e>_share); n of
    them, spread over identities and cameras, get a picture each."""
    out = Path(out)
    moe = frm_layer(model, layer)
    grid = token_grid(model)
    img_size = img_size or tuple(model.cfg.img_size)
    was_training = model.training
    model.eval()
    try:
        pids, cams, all_routes = route_split(model, shards, split, img_size, moe, limit=max(n, share_samples))
    finally:
        model.train(was_training)
    if all_routes.shape[2] != grid.tokens:
        raise RuntimeError(f"{moe.name}: {all_routes.shape[2]} tokens per image, expected {grid.tokens} "
                           f"({grid.prefix} prefix + {grid.grid[0]}x{grid.grid[1]} patches)")
    picked = spread_samples(pids.tolist(), cams.tolist(), n)
    images = read_split(shards, split, img_size, stop=picked[-1] + 1, keep_images=set(picked))["images"]
    routes = all_routes[picked]
    colours = expert_colours(moe.num_experts)
    pixels = denormalise(images)                                     # (n, 3, H, W, 3)
    out.mkdir(parents=True, exist_ok=True)
    pictures, described = [], []
    for k, position in enumerate(tqdm(picked, desc="expert pictures", unit="sample", disable=not progress,
                                      file=sys.stderr)):
        pid, cam = int(pids[position]), int(cams[position])
        header = f"{moe.name}  pid {pid}  cam {cam}  ({split} sample {position}; evaluation-mode routing)"
        picture, _ = render_sample(pixels[k], routes[k].numpy(), grid, colours, header, scale)
        path = out / f"experts_{k:02d}_pid{pid:04d}_cam{cam}.png"
        picture.save(path)
        pictures.append(path)
        described.append({"file": path.name, "pid": pid, "camid": cam, "position": position})
    counts = token_counts(all_routes, moe.num_experts)
    shares = routed_shares(counts)
    chart = plot_shares(counts, out / "expert_shares.png", moe.name, colours, len(all_routes), split)
    summary = out / "expert_shares.json"
    summary.write_text(json.dumps({
        "layer": moe.name, "split": split, "num_experts": moe.num_experts, "tokens_per_image": grid.tokens,
        "num_samples": len(all_routes), "routing": "evaluation mode (top-1, no router noise)",
        "caption": CAPTION.format(layer=moe.name), "shares": shares,
        "colours": ["#%02x%02x%02x" % tuple(int(v) for v in c) for c in colours], "samples": described,
        "tokens": {m: {**{str(e): int(counts[i, e]) for e in range(moe.num_experts)},
                       "dropped": int(counts[i, -1])} for i, m in enumerate(MODALITIES)},
    }, indent=2))
    return ExpertPictures(pictures, chart, summary, counts, routes, shares, moe.name)


def load_model(checkpoint):
    """(Config, MFRNet in eval mode) from an exported .pt file, or a checkpoint/run folder (exported to
    a temporary file first)."""
    from mfrnet_ds.engine.ckpt import export, load_exported

    path = Path(checkpoint)
    if path.is_file():
        return load_exported(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or folder")
    with tempfile.TemporaryDirectory(prefix="mfrnet_viz_") as tmp:
        return load_exported(export(path, Path(tmp) / "model.pt"))


def remove_old_pictures(out: Path) -> None:
    """Pictures of an earlier call with a larger --n would be mistaken for this call's."""
    if out.is_dir():
        for old in out.iterdir():
            if _PICTURE_NAME.match(old.name):
                old.unlink()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("experts", help="FRM expert of every patch, per sample, and the shares by modality")
    ex.add_argument("--checkpoint", required=True, help="run folder, checkpoints/ folder, tag folder or exported .pt")
    ex.add_argument("--shards", required=True, help="shard folder (holds manifest.json)")
    ex.add_argument("--out", required=True, type=Path, help="folder for the PNGs and expert_shares.json")
    ex.add_argument("--n", type=int, default=8, help="number of samples (default 8)")
    ex.add_argument("--split", default="query", choices=("query", "gallery"))
    ex.add_argument("--layer", help="FRM layer name, e.g. frm.11 (default: the last FRM layer)")
    ex.add_argument("--scale", type=int, help="integer upscaling of the images (default: panels >= 256 px tall)")
    args = parser.parse_args(argv)
    try:
        _, model = load_model(args.checkpoint)
        remove_old_pictures(args.out)
        result = expert_pictures(model, args.shards, args.out, n=args.n, split=args.split, layer=args.layer,
                                 scale=args.scale)
    except (FileNotFoundError, ValueError) as exc:
        print(f"viz: {exc}", file=sys.stderr)
        return 2
    print(f"{len(result.pictures)} pictures, {result.chart.name} and {result.summary.name} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
