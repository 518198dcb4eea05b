"""Feature Fusion Module: generation experts that rebuild each modality's tokens from the others.

Generator A makes RGB and NIR targets, generator B makes TIR targets (and T->N), as in the paper:
    N->R, T->R, R->N by A;   T->N, R->T, N->T by B.
Each generator is one sparse MoE called once per forward on the tokens of every present modality,
so its aux loss is counted once. A target's fused tokens are

    0.5 * own + sum_s w_s * generated(s -> target),   w = softmax over the sources' weight-head scores,

where a weight head scores the token mean of its source's *input* tokens (as the reference), and a missing
target is rebuilt from the present sources alone (no own term). With one source the softmax makes its
weight 1; the reference's `nt` path (RGB alone) multiplies by the raw score instead, which `reference_nt`
reproduces for ablations.
"""
from __future__ import annotations

import torch
from torch import nn

from mfrnet_ds.config import MODALITIES, FFMConfig, expert_hidden
from mfrnet_ds.model.moe import Expert, SparseMoE

# (source, target) -> generator
PAIRS = {(1, 0): "A", (2, 0): "A", (0, 1): "A", (2, 1): "B", (0, 2): "B", (1, 2): "B"}


def _pair_name(s: int, t: int) -> str:
    return f"{MODALITIES[s]}_to_{MODALITIES[t]}"


class FeatureFusion(nn.Module):
    def __init__(self, dim: int, cfg: FFMConfig, shared_experts: bool = False, reference_nt: bool = False):
        super().__init__()
        self.reference_nt = reference_nt
        hidden = expert_hidden(cfg, dim, 4 / 3)  # 768 -> 1024 in the paper
        self.generators = nn.ModuleDict({
            g: SparseMoE(dim, Expert(dim, hidden, cfg.dropout, residual=False), cfg, name=f"ffm.{g}",
                         shared_experts=shared_experts)
            for g in ("A", "B")
        })
        self.weight_heads = nn.ModuleDict({_pair_name(s, t): nn.Linear(dim, 1) for s, t in PAIRS})

    def forward(self, tokens: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """tokens: per modality (B, T, D), or None where the modality is missing -> three (B, T, D)."""
        present = [m for m, x in enumerate(tokens) if x is not None]
        if not present:
            raise ValueError("at least one modality must be present")
        stacked = torch.cat([tokens[m] for m in present])                     # (len(present) B, T, D)
        generated = {g: gen(stacked).chunk(len(present)) for g, gen in self.generators.items()}

        fused = []
        for t, own in enumerate(tokens):
            sources = [s for s in present if s != t]
            if not sources:        # the only present modality: nothing to fuse with
                fused.append(own)
                continue
            gens = [generated[PAIRS[(s, t)]][present.index(s)] for s in sources]      # each (B, T, D)
            scores = torch.cat([self.weight_heads[_pair_name(s, t)](tokens[s].mean(dim=1))
                                for s in sources], dim=1)                             # (B, S)
            w = scores if self.reference_nt and present == [0] else scores.softmax(dim=1)
            mix = sum(w[:, i, None, None] * g for i, g in enumerate(gens))
            fused.append(mix if own is None else 0.5 * own + mix)
        return fused
