"""MFRNet assembled: shared ViT over the three modalities, FFM after the embedding, FRM in the blocks, heads.

Shapes: B samples, M=3 modalities (rgb, nir, tir), T tokens (CLS + patches), D width, P projection.
The three images of a sample share one backbone: they are stacked modality-major on the batch axis
(3B, ...) and split again after.

Precision, decided here for the whole model: the backbone, FFM and FRM run in the dtype of the parameters
(fp32, or bf16/fp16 where DeepSpeed's mixed-precision engines cast them); routing runs in fp32 (moe.py, as
DeepSpeed's own gate). The head features leave `forward` as fp32, and `classify` (BNNeck, classifier) and
the losses after it compute in fp32 from fp32 views of their weights: batch statistics, the softmax over
hundreds of identities and the triplet distances are where bf16's 8-bit mantissa costs accuracy, and they
are a tiny share of the FLOPs. BN running statistics are fp32 buffers (DeepSpeed casts parameters only).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mfrnet_ds.config import MODALITIES, ModelConfig
from mfrnet_ds.model.backbone import build_vit, install_frm
from mfrnet_ds.model.fusion import FeatureFusion
from mfrnet_ds.model.layers import BNNeck, CameraEmbedding, TokenReduction
from mfrnet_ds.model.moe import SparseMoE, moe_layers
from mfrnet_ds.presets import PRESETS

MISSING_SETTINGS = ("r", "n", "t", "rn", "rt", "nt")   # the paper's M(RGB) ... M(NIR+TIR)
_LETTERS = "rnt"


@dataclass
class MFRNetOutput:
    features: list[torch.Tensor]   # fp32 pre-BN features for the triplet loss: one (B, 3P) or three (B, P)
    embedding: torch.Tensor        # (B, 3P) L2-normalised test embedding (fp32)
    aux_loss: torch.Tensor         # sum over MoE layers of weight x load-balancing loss


class MFRNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        preset = PRESETS[cfg.preset]
        self.cfg = cfg
        self.vit = build_vit(preset, cfg.img_size, cfg.drop_path, cfg.activation)
        self.frm_blocks = install_frm(self.vit, cfg.frm, shared_experts=cfg.reference_mode)
        self.camera = CameraEmbedding(cfg.num_cameras, preset.width, cfg.sie_coef)
        self.ffm = None
        if cfg.ffm.enabled:
            self.ffm = FeatureFusion(preset.width, cfg.ffm, shared_experts=cfg.reference_mode,
                                     reference_nt=cfg.reference_mode)
            if cfg.reference_mode:   # the released code adds the generators' aux loss once per block
                for gen in self.ffm.generators.values():
                    gen.aux_weight *= preset.depth
        P = preset.proj_dim
        per_modality = cfg.head == "per_modality"
        self.necks = nn.ModuleList([BNNeck(P, cfg.num_classes) for _ in MODALITIES] if per_modality else
                                   [BNNeck(3 * P, cfg.num_classes)])
        self.reductions = None
        if per_modality and cfg.head_pool == "cls_mean":
            self.reductions = nn.ModuleList([TokenReduction(P) for _ in MODALITIES])

    def compile_dense_blocks(self) -> int:
        """torch.compile every ViT block without an MoE layer, in place (parameters and state-dict keys stay as
        they are); the MoE blocks stay eager (DeepSpeed's gate and all-to-all). Returns how many were compiled."""
        dense = [b for b in self.vit.blocks if not isinstance(b.mlp, SparseMoE)]
        for block in dense:
            block.compile(dynamic=False)
        return len(dense)

    @property
    def moe_layers(self) -> list[SparseMoE]:
        return moe_layers(self)

    def forward(self, images: torch.Tensor, camids: torch.Tensor, missing: str = "") -> MFRNetOutput:
        """images: (B, 3, C, H, W) in modality order rgb, nir, tir; camids: (B,);
        missing: letters of absent modalities ("", "r", "nt", ...): those images are treated as zeros."""
        B = images.shape[0]
        absent = _parse_missing(missing)
        if absent:
            keep = torch.tensor([m not in absent for m in range(3)], device=images.device)
            images = images * keep.view(1, 3, 1, 1, 1).to(images.dtype)
        x = images.transpose(0, 1).reshape(3 * B, *images.shape[2:])       # (3B, C, H, W)
        x = self.vit.patch_embed(x)
        x = self.vit._pos_embed(x)                                          # (3B, T, D)
        x = self.camera(x, camids.repeat(3))
        if self.ffm is not None:
            per = [None if m in absent else t for m, t in enumerate(x.chunk(3))]
            x = torch.cat(self.ffm(per))                                    # (3B, T, D)
        x = self.vit.norm_pre(x)
        x = self.vit.blocks(x)
        x = self.vit.norm(x)
        features = [f.float() for f in self._head_features(x, B)]          # the precision boundary
        embedding = F.normalize(torch.cat(features, dim=1), dim=1)
        return MFRNetOutput(features, embedding, self._aux_loss(x))

    def classify(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """BNNeck + identity classifier per feature, in fp32 -> logits. In training mode BN normalises with the
        statistics of the batch it is given: the trainer passes the whole global micro batch (gathered over
        the ranks), so they do not depend on how the batch is split."""
        return [neck(f) for neck, f in zip(self.necks, features)]

    def _head_features(self, x: torch.Tensor, B: int) -> list[torch.Tensor]:
        if self.reductions is not None:
            tokens = self.vit.head(x).chunk(3)                              # 3 x (B, T, P)
            return [red(t) for red, t in zip(self.reductions, tokens)]      # 3 x (B, P)
        cls = self.vit.head(x[:, 0])                                        # (3B, P)
        if self.cfg.head == "per_modality":
            return list(cls.chunk(3))                                       # 3 x (B, P)
        return [cls.reshape(3, B, -1).transpose(0, 1).reshape(B, -1)]       # (B, 3P): [rgb | nir | tir]

    def _aux_loss(self, like: torch.Tensor) -> torch.Tensor:
        losses = [m.aux_loss for m in self.moe_layers]
        return torch.stack(losses).sum() if losses else like.new_zeros(())

    def moe_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per MoE layer, from the last forward on this rank: tokens per expert, dropped fraction and the
        unweighted load-balancing loss."""
        return {m.name: {"counts": m.expert_counts, "dropped": m.dropped_fraction, "balance": m.balance_loss}
                for m in self.moe_layers}

    def param_groups_by_role(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters by role, as the reference's optimiser sees them: the pretrained backbone, the MoE layers
        and the FFM ("experts": generators, routers, weight heads), and the rest MFRNet adds ("head": camera
        embedding, necks, token reductions)."""
        out: dict[str, list] = {"backbone": [], "experts": [], "head": []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("ffm.") or ".moe." in name:
                out["experts"].append((name, p))
            elif name.startswith("vit."):
                out["backbone"].append((name, p))
            else:
                out["head"].append((name, p))
        return out


def _parse_missing(missing: str) -> set[int]:
    if not missing:
        return set()
    if missing not in MISSING_SETTINGS:
        raise ValueError(f"missing={missing!r}: expected '' or one of {', '.join(MISSING_SETTINGS)} "
                         f"(letters of the absent modalities: r=RGB, n=NIR, t=TIR)")
    return {_LETTERS.index(c) for c in missing}
