"""Is the embedding healthy? Pure functions of the query/gallery embeddings, logged beside every evaluation.

- `mean_cosine`: mean cosine similarity over all pairs of distinct query embeddings. Near 1: every sample maps to
  nearly the same point (collapse); a spread-out embedding sits near 0.
- `effective_rank`: exp of the entropy of the normalised singular values of the query embedding matrix (Roy and
  Vetterli, 2007): how many directions the embeddings really use, between 1 and the embedding width.
- `same_camera_nn`: share of queries whose nearest gallery neighbour (the query itself excluded) was seen by the
  query's camera. Near 1 with a low mAP: the embedding encodes the camera (e.g. the SIE camera vector dominates
  an untrained model), not the identity.

`collapse_warning` flags a collapsed embedding: mean cosine above COLLAPSE_COSINE (pairs closer than ~26 degrees
on average) or an effective rank below COLLAPSE_RANK_FRACTION of the width.
"""
from __future__ import annotations

import torch

COLLAPSE_COSINE = 0.9
COLLAPSE_RANK_FRACTION = 0.05


def embedding_health(query: dict, gallery: dict, same_split: bool) -> dict[str, float]:
    """query/gallery: {"embedding" (N, D) L2-normalised, "camids" (N,), ...} as `embed.extract` returns them."""
    q = query["embedding"].double()
    n, dim = q.shape
    total = q.sum(0)
    mean_cosine = ((total @ total - (q * q).sum()) / max(1, n * (n - 1))).item()
    s = torch.linalg.svdvals(q)
    p = s / s.sum().clamp_min(1e-12)
    effective_rank = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()).item()
    sim = q @ gallery["embedding"].double().t()
    if same_split:
        sim.fill_diagonal_(-float("inf"))
    nearest = sim.argmax(dim=1)
    same_camera = (gallery["camids"][nearest] == query["camids"]).double().mean().item()
    return {"mean_cosine": mean_cosine, "effective_rank": effective_rank, "embedding_dim": float(dim),
            "same_camera_nn": same_camera}


def collapse_warning(health: dict[str, float]) -> str | None:
    """A one-line warning when the embedding has collapsed, else None."""
    why = []
    if health["mean_cosine"] > COLLAPSE_COSINE:
        why.append(f"mean pairwise cosine {health['mean_cosine']:.3f} > {COLLAPSE_COSINE}")
    if health["effective_rank"] < COLLAPSE_RANK_FRACTION * health["embedding_dim"]:
        why.append(f"effective rank {health['effective_rank']:.1f} < {COLLAPSE_RANK_FRACTION:g} x "
                   f"{health['embedding_dim']:.0f} dims")
    if not why:
        return None
    return "embedding collapsed: " + " and ".join(why) + " (query embeddings nearly identical; see eval/health.py)"
