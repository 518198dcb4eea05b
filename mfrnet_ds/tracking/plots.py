"""Figures of one training run from its files, written as PNGs for MLflow artifacts.

    records = read_train_log(OUT_DIR / "train_log.jsonl")
    history = log_history(records)                   # {metric: (steps, values)}
    learning_curves(history, OUT_DIR / "plots/learning_curves.png", evals=eval_history)
    expert_load_heatmap(history, OUT_DIR / "plots", label="run")

`history` has the shape of one run of `tracking.history.fetch_histories`; `mfrnet_ds.compare` draws its
expert-load heat maps (one panel per MoE layer, steps x experts) with the functions here. Matplotlib only:
no pandas, no MLflow.
"""
from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

EVAL_KEYS = ("mAP", "R1", "R5", "R10")
_DROPPED = re.compile(r"^dropped/(?P<layer>.+)$")
EXPERT_LOAD = re.compile(r"^expert_load/(?P<layer>.+)/(?P<expert>[^/]+)$")


def read_train_log(path: str | Path) -> list[dict]:
    """The JSON records of a train_log.jsonl; a damaged line (a killed writer) is skipped with a warning."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{number}: skipping a line that is not JSON: {line[:60]!r}", stacklevel=2)
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            else:
                warnings.warn(f"{path}:{number}: skipping a record without an integer 'step'", stacklevel=2)
    return records


def log_history(records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{metric: (steps, values)} sorted by step. A step logged twice (a resumed run repeats the steps
    after its checkpoint) keeps its last value, as compare does."""
    latest: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key in ("step", "time") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            latest.setdefault(key, {})[record["step"]] = float(value)
    history = {}
    for key, points in latest.items():
        steps = np.array(sorted(points), dtype=np.int64)
        history[key] = (steps, np.array([points[s] for s in steps], dtype=np.float64))
    return history


def learning_curves(history: dict, path: str | Path, evals: dict | None = None, title: str = "") -> Path | None:
    """2 x 2 panels: loss parts, learning rate, evaluation metrics (points), dropped token fraction per MoE
    layer (samples/s when no MoE layer logged). None when the history holds no loss."""
    losses = sorted(k for k in history if k == "loss" or k.startswith("loss_"))
    if not losses:
        return None
    path = Path(path)
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    (ax_loss, ax_lr), (ax_eval, ax_last) = axes
    for key in losses:
        ax_loss.plot(*history[key], label=key, lw=2.0 if key == "loss" else 1.2)
    ax_loss.set_title("loss")
    ax_loss.legend(fontsize=8)
    if "lr" in history:
        ax_lr.plot(*history["lr"], color="tab:purple")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.set_title("learning rate")
    evals = {k: v for k, v in (evals or {}).items() if k in EVAL_KEYS and len(v[0])}
    for key in EVAL_KEYS:
        if key in evals:
            ax_eval.plot(*evals[key], marker="o", ms=4, label=key)
    if evals:
        ax_eval.legend(fontsize=8)
    else:
        ax_eval.text(0.5, 0.5, "no evaluation logged", ha="center", va="center", transform=ax_eval.transAxes)
    ax_eval.set_title("evaluation (%)")
    dropped = sorted(k for k in history if _DROPPED.match(k))
    if dropped:
        for key in dropped:
            ax_last.plot(*history[key], label=_DROPPED.match(key)["layer"])
        ax_last.legend(fontsize=8)
        ax_last.set_title("dropped token fraction")
    else:
        if "samples_per_s" in history:
            ax_last.plot(*history["samples_per_s"], color="tab:green")
        ax_last.set_title("samples / s")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def expert_load_heatmap(history: dict, out_dir: str | Path, label: str) -> Path | None:
    """The steps x experts heat map (one panel per layer) as out_dir/expert_load_<label>.png;
    None when no `expert_load/<layer>/<expert>` metric was logged."""
    layers = expert_load_matrices(history)
    if not layers:
        return None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return plot_expert_load(label, layers, out_dir)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "metric"


def expert_load_matrices(history: dict[str, tuple[np.ndarray, np.ndarray]]):
    """{layer: (steps, expert names, steps x experts matrix)} from expert_load/<layer>/<expert>."""
    by_layer: dict[str, dict[str, tuple]] = defaultdict(dict)
    for key, series in history.items():
        match = EXPERT_LOAD.match(key)
        if match:
            by_layer[match["layer"]][match["expert"]] = series
    layers = {}
    for layer, experts in sorted(by_layer.items()):
        names = sorted(experts, key=lambda e: (not e.isdigit(), int(e) if e.isdigit() else 0, e))
        steps = np.unique(np.concatenate([experts[e][0] for e in names]))
        matrix = np.full((steps.size, len(names)), np.nan)
        for j, name in enumerate(names):
            s, v = experts[name]
            matrix[np.searchsorted(steps, s), j] = v
        layers[layer] = (steps, names, matrix)
    return layers


def plot_expert_load(label: str, layers, out: Path) -> Path:
    fig, axes = plt.subplots(1, len(layers), figsize=(2.2 + 2.6 * len(layers), 4.2), squeeze=False)
    vmax = max(float(np.nanmax(m)) if np.isfinite(m).any() else 1.0 for _, _, m in layers.values())
    for ax, (layer, (steps, names, matrix)) in zip(axes[0], layers.items()):
        image = ax.imshow(matrix, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=vmax,
                          interpolation="nearest")
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ticks = np.unique(np.linspace(0, steps.size - 1, min(6, steps.size)).astype(int))
        ax.set_yticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
    axes[0][0].set_ylabel("step")
    fig.colorbar(image, ax=axes[0].tolist(), label="fraction of tokens")
    fig.suptitle(f"expert load: {label}", fontsize=10)
    path = out / f"expert_load_{safe_name(label)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
