"""Distributed feature extraction and scoring: each rank embeds a slice, rank 0 gathers once and scores.

The eval loader gives every rank the same number of equal-sized batches (the MoE all-to-all needs equal
shapes on all ranks); padded rows are marked invalid and dropped after the gather.

Damaged data never costs an evaluation: a sample that is cut from its shard, incomplete or does not decode
comes from the loader as a blank stand-in row (valid = False), so it is scored as absent: the metrics are
those of the valid samples, exactly as if the shards had been built without the damaged ones (an embedding
does not depend on its batch-mates at evaluation: model.*.eval_drop_tokens is off by default). Each split's
damaged samples are counted (`damaged_query`, `damaged_gallery` in `evaluate`'s metrics); more than
`max_damaged_share` (data.max_damaged_share) of a split damaged raises DamagedSplitError on every rank.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from mfrnet_ds.config import UserError
from mfrnet_ds.engine import dist as D
from mfrnet_ds.eval.health import embedding_health
from mfrnet_ds.eval.metrics import evaluate_rank
from mfrnet_ds.eval.rerank import k_reciprocal
from mfrnet_ds.shards import manifest_protocol
from mfrnet_ds.stream.pipeline import eval_loader


class DamagedSplitError(UserError, ValueError):
    """More of an evaluation split is damaged than data.max_damaged_share allows; raised on every rank at the
    same point. A UserError: the launchers print its one-line message, no traceback."""


@torch.no_grad()
def extract(model, shards: str, split: str, *, img_size, batch_size: int, rank: int, world_size: int,
            device: torch.device, missing: str = "", num_workers: int = 1, progress: bool = False,
            dtype: torch.dtype = torch.float32, max_damaged_share: float | None = None,
            split_label: str | None = None) -> dict[str, torch.Tensor] | None:
    """Embeddings of one split's valid samples, in split order, on rank 0 (None elsewhere):
    {"embedding", "pids", "camids", "sceneids", "index" (position in the split)} plus "damaged": the
    sorted positions of the split's damaged samples, which have no row (see the module doc).

    With `max_damaged_share`, more than that share of the split damaged raises DamagedSplitError on every
    rank (the damaged positions are shared by all ranks, so none is left waiting in a collective);
    `split_label` names the split in that message (default: `split`)."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("embedding", "pids", "camids", "sceneids", "index",
                                                             "valid", "damaged")}
    loader = eval_loader(shards, split, batch_size=batch_size, img_size=img_size, rank=rank,
                         world_size=world_size, num_workers=num_workers)
    with torch.random.fork_rng(devices=[]):   # building the iterator must not move the training RNG
        batches = iter(loader)
    for b in tqdm(batches, desc=f"embed {split}{' missing ' + missing if missing else ''}", disable=not progress,
                  leave=False):
        images = b["images"].to(device, dtype=dtype, non_blocking=True)
        out = model(images, b["camids"].to(device), missing=missing)
        parts["embedding"].append(out.embedding.float().cpu())
        for k in ("pids", "camids", "sceneids", "index", "valid", "damaged"):
            parts[k].append(b[k].cpu())
    local = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
    model.train(was_training)
    damaged = _damaged_positions(local, world_size)
    if max_damaged_share is not None:
        check_damage(split_label or split, damaged, loader.dataset, max_damaged_share)
    gathered = _gather_to_rank0(local, rank, world_size)
    if gathered is None:
        return None
    keep = gathered["valid"].bool()
    order = torch.argsort(gathered["index"][keep])
    out = {k: v[keep][order] for k, v in gathered.items() if k not in ("valid", "damaged")}
    out["damaged"] = torch.tensor(damaged, dtype=torch.int64)
    return out


def _damaged_positions(local: dict[str, torch.Tensor], world_size: int) -> list[int]:
    """Sorted split positions of the damaged samples of all ranks, on every rank."""
    mine = sorted(set(local["index"][local["damaged"].bool()].tolist())) if len(local["index"]) else []
    if world_size == 1:
        return mine
    return sorted(set().union(*D.all_ranks(mine)))


def check_damage(split: str, damaged: list[int], stream, max_share: float) -> None:
    """DamagedSplitError when more than `max_share` of the split's samples are damaged, or all of them;
    `stream` is the split's EvalStream (its folder, shards and their sizes)."""
    total = sum(n for _, n in stream.shards)
    share = len(damaged) / max(1, total)
    if share <= max_share and len(damaged) < total:
        return
    per_shard: dict[str, int] = {}
    for pos in damaged:
        name = stream.shard_of(pos)
        per_shard[name] = per_shard.get(name, 0) + 1
    where = ", ".join(f"{name} ({n})" for name, n in per_shard.items())
    limit = f"data.max_damaged_share={max_share:g} ({100 * max_share:.1f}%)"
    why = f"more than {limit} allows" if share > max_share else f"nothing is left to score ({limit})"
    raise DamagedSplitError(
        f"evaluation split {split} of {stream.dir}: {len(damaged)} of {total} samples ({100 * share:.1f}%) are "
        f"damaged, {why}; damaged samples by shard: {where}. Rebuild or re-copy these shards "
        f"(python shards/build.py ...), or raise data.max_damaged_share to score the rest")


def _gather_to_rank0(local: dict[str, torch.Tensor], rank: int, world_size: int):
    if world_size == 1:
        return local
    out = D.gather_to_main(local)
    if rank != 0:
        return None
    return {k: torch.cat([o[k] for o in out]) for k in local}


def score(query: dict, gallery: dict, match_by: str = "camids", *, re_ranking: bool = False) -> dict[str, float]:
    """mAP and CMC (percent) with the dataset's protocol: a gallery entry with the query's id and the same
    `match_by` id ("camids" or "sceneids", the manifest's protocol) is left out of its ranking. Distances:
    squared Euclidean on L2-normalised embeddings,
    or with `re_ranking` those distances k-reciprocally re-ranked (eval/rerank.py) with the reference's
    evaluator settings k1=50, k2=15, lambda=0.3 (the paper's 20/6 is commented out there); needs
    query + gallery > 50 samples and (query + gallery)^2 float32 of memory."""
    q, g = query["embedding"], gallery["embedding"]
    if re_ranking:
        distmat = k_reciprocal(q, g, k1=50, k2=15, lam=0.3)
    else:
        distmat = (2 - 2 * q @ g.t()).clamp_min(0).numpy().astype(np.float64)
    cmc, mAP = evaluate_rank(distmat, query["pids"].numpy(), gallery["pids"].numpy(),
                             query[match_by].numpy(), gallery[match_by].numpy(), max_rank=min(50, len(g)))
    cmc = list(cmc) + [cmc[-1]] * max(0, 10 - len(cmc))
    return {"mAP": 100 * float(mAP), "R1": 100 * float(cmc[0]), "R5": 100 * float(cmc[4]),
            "R10": 100 * float(cmc[9])}


def evaluate(model, shards: str, manifest: dict, *, img_size, batch_size: int, rank: int, world_size: int,
             device, missing: str = "", num_workers: int = 1, progress: bool = False,
             dtype: torch.dtype = torch.float32, re_ranking: bool = False,
             max_damaged_share: float | None = None) -> dict[str, float] | None:
    """Embed query and gallery (once if they are the same shards) and score their valid samples; rank 0 gets
    the numbers: mAP, R1, R5, R10 (k-reciprocally re-ranked with `re_ranking`), the embedding's health
    (eval/health.py, always on the plain embeddings) and `damaged_query`, `damaged_gallery`: how many
    samples of each split were damaged and left out (the same count twice when they are the same shards).
    `max_damaged_share` (data.max_damaged_share): a larger damaged share of a split raises
    DamagedSplitError on every rank; None: no limit."""
    kw = dict(img_size=img_size, batch_size=batch_size, rank=rank, world_size=world_size, device=device,
              missing=missing, num_workers=num_workers, progress=progress, dtype=dtype,
              max_damaged_share=max_damaged_share)
    same = same_shards(manifest)
    query = extract(model, shards, "query", split_label="query (also the gallery: the same shards)" if same
                    else None, **kw)
    gallery = query if same else extract(model, shards, "gallery", **kw)
    if rank != 0:
        return None
    return {**score(query, gallery, manifest_protocol(manifest).match_by, re_ranking=re_ranking),
            **embedding_health(query, gallery, same),
            "damaged_query": len(query["damaged"]), "damaged_gallery": len(gallery["damaged"])}


def same_shards(manifest: dict) -> bool:
    """Query and gallery are the same shards (RGBNT201 lists its test set for both)."""
    splits = manifest["splits"]
    return [s["name"] for s in splits["query"]["shards"]] == [s["name"] for s in splits["gallery"]["shards"]]


def evaluate_settings(model, shards: str, manifest: dict, settings: list[str], *, re_ranking: bool = False,
                      **kw) -> dict[str, dict] | None:
    """{setting: metrics} for the full-modality setting ("") and any missing-modality ones; rank 0 only.
    `re_ranking`: k-reciprocal re-ranking of every setting's distances (see `evaluate`)."""
    results = {m: evaluate(model, shards, manifest, missing=m, re_ranking=re_ranking, **kw) for m in settings}
    return results if kw["rank"] == 0 else None


def format_table(results: dict[str, dict], pixel: dict | None = None) -> str:
    """The results as a text table; `pixel` (raw-pixel matching, eval/pixel.py) adds its row first; the
    damaged samples left out of each split and the full-modality row's embedding health follow the table."""
    names = {"": "all modalities", "r": "M(RGB)", "n": "M(NIR)", "t": "M(TIR)", "rn": "M(RGB+NIR)",
             "rt": "M(RGB+TIR)", "nt": "M(NIR+TIR)"}
    lines = [f"{'setting':<16}{'mAP':>8}{'R1':>8}{'R5':>8}{'R10':>8}"]
    if pixel is not None:
        lines.append(f"{'pixel baseline':<16}" + "".join(f"{pixel[k]:>8.2f}" for k in ("mAP", "R1", "R5", "R10")))
    for m, r in results.items():
        lines.append(f"{names.get(m, m):<16}" + "".join(f"{r[k]:>8.2f}" for k in ("mAP", "R1", "R5", "R10")))
    missing = [r for m, r in results.items() if m]
    if len(missing) > 1:
        lines.append(f"{'missing avg':<16}" + "".join(
            f"{sum(r[k] for r in missing) / len(missing):>8.2f}" for k in ("mAP", "R1", "R5", "R10")))
    damage = next((r for r in results.values() if "damaged_query" in r), None)
    if damage is not None:   # the data's damage, the same for every setting
        lines.append(f"damaged samples left out: query {damage['damaged_query']}, "
                     f"gallery {damage['damaged_gallery']}")
    full = results.get("")
    if full and "mean_cosine" in full:
        lines.append(f"embedding: mean pairwise cosine {full['mean_cosine']:.3f}, effective rank "
                     f"{full['effective_rank']:.1f} of {full['embedding_dim']:.0f}, nearest gallery neighbour from "
                     f"the query's camera {100 * full['same_camera_nn']:.0f}%")
    return "\n".join(lines)
