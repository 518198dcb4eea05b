"""The CLIP visual tower on timm's VisionTransformer, FRM experts in place of block MLPs, weight loading.

timm's ViT with pre_norm + QuickGELU + a bias-initialised-to-zero head is exactly CLIP's visual tower:
`norm_pre` is ln_pre, `norm` is ln_post and `head` is the projection.
"""
from __future__ import annotations

import logging
import zipfile
from functools import partial
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer, _convert_openai_clip
from torch import nn

from mfrnet_ds.config import FRMConfig, expert_hidden
from mfrnet_ds.model.moe import Expert, SparseMoE
from mfrnet_ds.model.presets import Preset

log = logging.getLogger(__name__)
PATCH = 16


def build_vit(preset: Preset, img_size: tuple[int, int], drop_path: float = 0.0) -> VisionTransformer:
    return VisionTransformer(
        img_size=img_size, patch_size=PATCH, embed_dim=preset.width, depth=preset.depth,
        num_heads=preset.heads, pre_norm=True, norm_layer=partial(nn.LayerNorm, eps=1e-5),
        act_layer="quick_gelu", num_classes=preset.proj_dim, global_pool="token", class_token=True,
        drop_path_rate=drop_path,
    )


def install_frm(vit: VisionTransformer, cfg: FRMConfig) -> list[int]:
    """Replace the MLP of `cfg.blocks` by representation experts; returns the absolute block indices."""
    dim = vit.embed_dim
    hidden = expert_hidden(cfg, dim, 2 / 3)  # 768 -> 512 in the paper
    depth = len(vit.blocks)
    indices = sorted({b % depth for b in cfg.blocks})
    for i in indices:
        # timm's Block computes x + mlp(norm2(x)); the expert's own residual sits inside the MoE.
        vit.blocks[i].mlp = SparseMoE(dim, Expert(dim, hidden, cfg.dropout, residual=True), cfg, name=f"frm.{i}")
    return indices


# ---------------------------------------------------------------------------------------------
# Pretrained weights from a local file.

def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file: a plain/wrapped state dict (read with weights_only=True) or the
    TorchScript archive OpenAI ships CLIP as."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} do not exist (nothing is downloaded: give a local file)")
    if _is_torchscript(path):
        return {k: v.detach() for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or a CLIP TorchScript archive)")
    return obj


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def adapt_state_dict(sd: dict[str, torch.Tensor], vit: VisionTransformer) -> dict[str, torch.Tensor]:
    """Foreign weights -> our timm keys: OpenAI CLIP (`visual.*` or bare CLIP visual keys) or timm, with
    the position embedding resampled to this model's token grid. Pure: dict in, dict out."""
    if any(k.startswith("visual.") for k in sd):
        sd = _convert_openai_clip(sd, vit, prefix="visual.")
    elif "conv1.weight" in sd and "class_embedding" in sd:
        sd = _convert_openai_clip(sd, vit, prefix="")
    sd = dict(sd)
    pos = sd.get("pos_embed")
    if pos is not None and pos.shape != vit.pos_embed.shape:
        sd["pos_embed"] = resample_abs_pos_embed(pos, new_size=vit.patch_embed.grid_size, num_prefix_tokens=1)
    return sd


def load_pretrained(vit: VisionTransformer, path: str | Path) -> tuple[list[str], list[str]]:
    """Load local weights into the backbone; returns and logs (missing, unexpected) keys.

    Expected mismatches: the MLP weights of FRM blocks (their experts are new) are unexpected, and the
    FRM experts/routers are missing.
    """
    sd = adapt_state_dict(read_weights(path), vit)
    own = vit.state_dict()
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        k = bad[0]
        raise ValueError(f"{path}: {k} has shape {tuple(sd[k].shape)}, the model expects {tuple(own[k].shape)} "
                         f"(wrong preset?); {len(bad)} mismatched tensors in all")
    result = vit.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if ".moe." not in k]
    unexpected = list(result.unexpected_keys)
    log.info("loaded %s: %d tensors, %d missing (non-MoE), %d unexpected", path, len(sd), len(missing),
             len(unexpected))
    for k in missing:
        log.warning("pretrained %s: missing %s", path, k)
    for k in unexpected:
        log.warning("pretrained %s: unexpected %s", path, k)
    return result.missing_keys, unexpected
