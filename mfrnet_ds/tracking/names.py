"""MLflow metric names: the trainer's flat keys -> namespaces that sort the way people read a run.

The trainer's own files (train_log.jsonl, eval_log.jsonl, metrics.json) keep the flat keys (`loss`,
`mAP`, `expert_load/frm.3/0`); everything sent to MLflow goes through `mlflow_metrics()`, so the UI shows

    eval/mAP, eval/R1, eval/R5, eval/R10     fractions 0..1 (the files hold percent, 0..100)
    eval/best_mAP ... eval/best_epoch        the best evaluation so far
    eval/missing_<m>/mAP ...                 the missing-modality settings
    eval/pixel_baseline/mAP ...              the trivial baseline beside every evaluation
    eval/damaged_query, eval/damaged_gallery counts of left-out samples
    eval/health/mean_cosine, ...             embedding health (mfrnet_ds/eval/health.py)
    eval/moe/<layer>/expert_<e>_share        routing of the query split in evaluation mode (no noise)
    train/loss, train/loss_id, train/lr, train/grad_norm, train/samples_per_s
    moe/<layer>/expert_<e>_share             share of the layer's routed tokens in training (fraction)
    moe/<layer>/dropped_share, moe/<layer>/balance_loss

MLflow sorts charts by name and gives each first segment its own section: eval before moe before
system before train. `flat_key()` maps a name back (compare reads old and new runs alike).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

RANK_KEYS = ("mAP", "R1", "R5", "R10")     # percent in the trainer, fractions in MLflow
TRAIN_KEYS = ("loss", "loss_id", "loss_tri", "loss_aux", "lr", "grad_norm", "samples_per_s")
HEALTH_KEYS = ("mean_cosine", "effective_rank", "embedding_dim", "same_camera_nn")

_MISSING = re.compile(r"^(?P<key>mAP|R1|R5|R10)_missing_(?P<m>[a-z]+)$")
_HEALTH_MISSING = re.compile(rf"^(?P<key>{'|'.join(HEALTH_KEYS)})_missing_(?P<m>[a-z]+)$")
_PIXEL = re.compile(r"^pixel_(?P<key>mAP|R1|R5|R10)$")
_BEST = re.compile(r"^best_(?P<key>mAP|R1|R5|R10|epoch)$")
_LOAD = re.compile(r"^expert_load/(?P<layer>[^/]+)/(?P<e>\d+)$")
_EVAL_LOAD = re.compile(r"^eval_expert_load/(?P<layer>[^/]+)/(?P<e>\d+)$")
_DROPPED = re.compile(r"^dropped/(?P<layer>[^/]+)$")
_BALANCE = re.compile(r"^balance/(?P<layer>[^/]+)$")

# MLflow name -> flat key, built from the same patterns (one table both ways)
_BACK = [
    (re.compile(r"^eval/missing_(?P<m>[a-z]+)/(?P<key>mAP|R1|R5|R10)$"), "{key}_missing_{m}"),
    (re.compile(r"^eval/missing_(?P<m>[a-z]+)/health/(?P<key>[a-z_]+)$"), "{key}_missing_{m}"),
    (re.compile(r"^eval/health/(?P<key>[a-z_]+)$"), "{key}"),
    (re.compile(r"^eval/pixel_baseline/(?P<key>mAP|R1|R5|R10)$"), "pixel_{key}"),
    (re.compile(r"^eval/best_(?P<key>mAP|R1|R5|R10|epoch)$"), "best_{key}"),
    (re.compile(r"^eval/moe/(?P<layer>[^/]+)/expert_(?P<e>\d+)_share$"), "eval_expert_load/{layer}/{e}"),
    (re.compile(r"^eval/(?P<key>mAP|R1|R5|R10|damaged_query|damaged_gallery)$"), "{key}"),
    (re.compile(r"^moe/(?P<layer>[^/]+)/expert_(?P<e>\d+)_share$"), "expert_load/{layer}/{e}"),
    (re.compile(r"^moe/(?P<layer>[^/]+)/dropped_share$"), "dropped/{layer}"),
    (re.compile(r"^moe/(?P<layer>[^/]+)/balance_loss$"), "balance/{layer}"),
    (re.compile(r"^train/(?P<key>.+)$"), "{key}"),
]


def is_fraction_scaled(key: str) -> bool:
    """True for the flat keys held in percent by the trainer and logged to MLflow as fractions."""
    return (key in RANK_KEYS or bool(_MISSING.match(key) or _PIXEL.match(key))
            or (bool(_BEST.match(key)) and key != "best_epoch"))


def mlflow_name(key: str) -> str:
    """The MLflow name of one flat trainer key; a key this table does not know keeps its name."""
    if key in RANK_KEYS or key in ("damaged_query", "damaged_gallery"):
        return f"eval/{key}"
    if key in TRAIN_KEYS:
        return f"train/{key}"
    if key in HEALTH_KEYS:
        return f"eval/health/{key}"
    for pattern, template in ((_MISSING, "eval/missing_{m}/{key}"),
                              (_HEALTH_MISSING, "eval/missing_{m}/health/{key}"), (_PIXEL, "eval/pixel_baseline/{key}"),
                              (_BEST, "eval/best_{key}"), (_LOAD, "moe/{layer}/expert_{e}_share"),
                              (_EVAL_LOAD, "eval/moe/{layer}/expert_{e}_share"),
                              (_DROPPED, "moe/{layer}/dropped_share"), (_BALANCE, "moe/{layer}/balance_loss")):
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict())
    return key


def flat_key(name: str) -> str:
    """The trainer's flat key of an MLflow metric name (an old run's flat name maps to itself)."""
    for pattern, template in _BACK:
        match = pattern.match(name)
        if match:
            return template.format(**match.groupdict())
    return name


def mlflow_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The trainer's {key: value} as logged to MLflow: namespaced names, percentages as fractions."""
    return {mlflow_name(k): float(v) / 100.0 if is_fraction_scaled(k) else float(v) for k, v in metrics.items()}


def from_mlflow(name: str, value: float) -> tuple[str, float]:
    """(flat key, value in the trainer's units) of one MLflow metric; old flat-named runs pass through."""
    key = flat_key(name)
    return key, value * 100.0 if key != name and is_fraction_scaled(key) else value
