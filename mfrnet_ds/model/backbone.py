"""The CLIP visual tower on timm's VisionTransformer, FRM experts in place of block MLPs, weight loading.

timm's ViT with pre_norm + QuickGELU + a bias-initialised-to-zero head is exactly CLIP's visual tower:
`norm_pre` is ln_pre, `norm` is ln_post and `head` is the projection.
"""
from __future__ import annotations

import argparse
import logging
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer, _convert_openai_clip
from torch import nn

from mfrnet_ds.config import BadFileError, FRMConfig, MissingFileError, expert_hidden
from mfrnet_ds.model.moe import Expert, SparseMoE
from mfrnet_ds.presets import Preset

log = logging.getLogger(__name__)
PATCH = 16


def build_vit(preset: Preset, img_size: tuple[int, int], drop_path: float = 0.0,
              activation: str = "quick_gelu") -> VisionTransformer:
    return VisionTransformer(
        img_size=img_size, patch_size=PATCH, embed_dim=preset.width, depth=preset.depth,
        num_heads=preset.heads, pre_norm=True, norm_layer=partial(nn.LayerNorm, eps=1e-5),
        act_layer=activation, num_classes=preset.proj_dim, global_pool="token", class_token=True,
        drop_path_rate=drop_path,
    )


def install_frm(vit: VisionTransformer, cfg: FRMConfig, shared_experts: bool = False) -> list[int]:
    """Replace the MLP of `cfg.blocks` by representation experts; returns the absolute block indices."""
    dim = vit.embed_dim
    hidden = expert_hidden(cfg, dim, 2 / 3)  # 768 -> 512 in the paper
    depth = len(vit.blocks)
    indices = sorted({b % depth for b in cfg.blocks})
    for i in indices:
        # timm's Block computes x + mlp(norm2(x)); the expert's own residual sits inside the MoE.
        vit.blocks[i].mlp = SparseMoE(dim, Expert(dim, hidden, cfg.dropout, residual=True), cfg, name=f"frm.{i}",
                                     shared_experts=shared_experts)
    return indices


# ---------------------------------------------------------------------------------------------
# Pretrained weights from a local file.
#
# Loading is strict: a wrong file stops the run instead of leaving the tower random. The file and the
# backbone may differ only in
#   missing     the FRM experts and routers (`blocks.{i}.mlp.moe.*` of the FRM blocks), which are new;
#   unexpected  the MLP of the FRM blocks (`blocks.{i}.mlp.fc1/fc2.weight/bias`), which the experts replace,
#               and, in a full CLIP file (`visual.*` keys), everything outside `visual.` (the text tower,
#               logit_scale, ...), which is never read.
# Any other missing or unexpected tensor, or a file none of whose tensors is ours, is a ValueError.

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass
class WeightsFile:
    """What a weights file holds: its tensors, the container they came in and, where the file records it,
    the MLP activation the weights were trained with."""
    state_dict: dict[str, torch.Tensor]
    container: str                 # "TorchScript archive", "checkpoint['state_dict']", "plain state dict"
    activation: str | None = None  # "quick_gelu" | "gelu" | None (the file does not say)
    activation_source: str = ""    # where the file says it


@dataclass
class _Adapted:
    state_dict: dict[str, torch.Tensor]   # in our timm keys
    layout: str                           # the key layout found
    names: dict[str, str]                 # our key -> the file's key it came from
    ignored: list[str]                    # file keys never read: a CLIP file's non-visual part
    stripped: bool                        # a DDP `module.` prefix was removed
    clip_prefix: str | None               # "visual." / "" for CLIP layouts, None for timm


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file: a plain/wrapped state dict (read with weights_only=True; an open_clip
    or timm training checkpoint keeps it under 'state_dict') or the TorchScript archive OpenAI ships CLIP as."""
    return read_weights_file(path).state_dict


def read_weights_file(path: str | Path) -> WeightsFile:
    """`read_weights` plus what the file records about itself (see `WeightsFile`)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"pretrained weights {path} do not exist (nothing is downloaded: give a local file)")
    if _is_torchscript(path):
        sd = {k: v.detach() for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
        if any(k.startswith("visual.") for k in sd):
            # OpenAI ships CLIP only as TorchScript, and OpenAI CLIP uses QuickGELU
            return WeightsFile(sd, "TorchScript archive", "quick_gelu", "the file is OpenAI's CLIP TorchScript archive")
        return WeightsFile(sd, "TorchScript archive")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # timm's training checkpoints keep their args
            top = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for a file it cannot read
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise BadFileError(f"{path}: not a PyTorch checkpoint/state dict nor a CLIP TorchScript archive "
                             f"({type(e).__name__}: {first})") from e
    obj, wrappers = top, []
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj, wrappers = obj[key], wrappers + [key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise BadFileError(f"{path}: expected a state dict of tensors (or a CLIP TorchScript archive), found "
                             f"{type(obj).__name__}")
    if not wrappers:
        return WeightsFile(obj, "plain state dict")
    activation, source = _recorded_activation(top)
    return WeightsFile(obj, "checkpoint" + "".join(f"[{k!r}]" for k in wrappers), activation, source)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _recorded_activation(ckpt: dict) -> tuple[str | None, str]:
    """The activation a checkpoint records about itself: an open_clip model config with an explicit
    `quick_gelu`, or the timm architecture name a timm training checkpoint stores as 'arch'. Nothing else
    counts (in particular no guessing from the weights)."""
    for key in ("model_cfg", "model_config"):
        cfg = ckpt.get(key)
        if isinstance(cfg, dict) and isinstance(cfg.get("quick_gelu"), bool):
            return ("quick_gelu" if cfg["quick_gelu"] else "gelu"), f"its open_clip model config ({key}['quick_gelu'])"
    arch = ckpt.get("arch")
    if isinstance(arch, str):
        act = _timm_activation(arch)
        if act:
            return act, f"its timm architecture {arch!r}"
    return None, ""


def _timm_activation(arch: str) -> str | None:
    """The MLP activation of a timm architecture, built on the meta device (registered names only: nothing
    is fetched)."""
    import timm

    name = arch.split(".")[0]  # without a pretrained tag
    if not timm.is_model(name):
        return None
    with torch.device("meta"):
        return _activation_of(timm.create_model(name, pretrained=False))


def _activation_of(vit: nn.Module) -> str | None:
    """The activation ("quick_gelu" | "gelu") of the MLP of the first block that has one, else None."""
    for block in getattr(vit, "blocks", []):
        act = getattr(getattr(block, "mlp", None), "act", None)
        if act is not None:
            return {"QuickGELU": "quick_gelu", "GELU": "gelu"}.get(type(act).__name__)
    return None


def _adapt(sd: dict[str, torch.Tensor], vit: VisionTransformer) -> _Adapted:
    stripped = bool(sd) and all(k.startswith("module.") for k in sd)
    if stripped:
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("visual.") for k in sd):
        layout, prefix = "OpenAI CLIP / open_clip (visual.*)", "visual."
    elif "conv1.weight" in sd and "class_embedding" in sd:
        layout, prefix = "CLIP visual tower (bare)", ""
    else:
        layout, prefix = "timm ViT", None
    out, names, ignored = {}, {}, []
    for k, v in sd.items():
        if prefix is None:
            out[k], names[k] = v, k
        elif not k.startswith(prefix):
            ignored.append(k)
        else:
            for new, value in _convert_openai_clip({k: v}, vit, prefix=prefix).items():
                out[new], names[new] = value, k
    pos = out.get("pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape != vit.pos_embed.shape:
        out["pos_embed"] = resample_abs_pos_embed(pos, new_size=vit.patch_embed.grid_size, num_prefix_tokens=1)
    return _Adapted(out, layout, names, ignored, stripped, prefix)


_TO_CLIP = (("patch_embed.proj", "conv1"), ("blocks.", "transformer.resblocks."), ("norm_pre", "ln_pre"),
            ("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"),
            ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def _clip_name(key: str) -> str:
    """Our key -> the CLIP visual key it is read from (for messages)."""
    special = {"cls_token": "class_embedding", "pos_embed": "positional_embedding", "head.weight": "proj",
               "head.bias": "proj"}
    if key in special:
        return special[key]
    if key.startswith("norm."):
        return "ln_post." + key[len("norm."):]
    for ours, clip in _TO_CLIP:
        key = key.replace(ours, clip)
    return key


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _check_keys(path: Path, vit: VisionTransformer, own: dict, file, a, found: str, container: str):
    """(assigned, missing, unexpected) keys of the file against the backbone's state dict `own`; BadFileError
    unless only the FRM experts/routers are missing and only the MLPs they replace (and a CLIP file's non-visual
    part) are extra."""
    sd = a.state_dict
    frm = [i for i, block in enumerate(vit.blocks) if isinstance(block.mlp, SparseMoE)]
    new = tuple(f"blocks.{i}.mlp." for i in frm)  # experts and routers
    replaced = {f"blocks.{i}.mlp.{fc}.{p}" for i in frm for fc in ("fc1", "fc2") for p in ("weight", "bias")}
    assigned = [k for k in sd if k in own]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad_missing = [k for k in missing if not k.startswith(new)]
    bad_unexpected = [k for k in unexpected if k not in replaced]
    if not assigned:
        raise BadFileError(f"{path}: none of its tensors belongs to this backbone (found a {container}; its keys: "
                             f"{_few(list(file.state_dict))}); expected OpenAI CLIP / open_clip `visual.*` keys "
                             f"or timm ViT keys ({_few(list(own))})")
    if bad_missing or bad_unexpected:
        def in_file(k: str) -> str:  # a missing key as the file would have named it
            return f"{k} ({a.clip_prefix}{_clip_name(k)})" if a.clip_prefix is not None else k

        experts = ", ".join(f"blocks.{i}.mlp.moe.*" for i in frm) or "none"
        raise BadFileError(
            f"{path}: does not fit this backbone (found {found}, {len(assigned)} of them ours): "
            f"{len(bad_missing)} backbone tensors missing" + (f" ({_few([in_file(k) for k in bad_missing])})"
                                                              if bad_missing else "")
            + f", {len(bad_unexpected)} unexpected tensors" + (f" ({_few([a.names[k] for k in bad_unexpected])})"
                                                             if bad_unexpected else "")
            + f"; expected every backbone tensor except the FRM experts/routers ({experts}), and nothing "
              f"more than the FRM blocks' MLP" + (" and a CLIP file's non-visual part" if a.clip_prefix else ""))
    return assigned, missing, unexpected


def load_pretrained(vit: VisionTransformer, path: str | Path,
                    activation: str | None = None) -> tuple[list[str], list[str]]:
    """Load local weights into the backbone, strictly: see the rules in the comment opening this section.

    activation: the configured `model.activation`; None = the one `vit` was built with. Where the file
    records its activation (OpenAI's TorchScript archive, a checkpoint with its model config or timm
    architecture) a contradiction is a ValueError; otherwise one info line says which is used.
    Returns (missing, unexpected) keys as `load_state_dict` reports them (the expected ones only).
    """
    path = Path(path)
    file = read_weights_file(path)
    a = _adapt(file.state_dict, vit)
    sd = a.state_dict
    container = (f"{file.container}" + (", DDP 'module.' prefix stripped" if a.stripped else "")
                 + f", {len(file.state_dict)} tensors")
    found = f"{a.layout} keys in a {container}"
    own = vit.state_dict()
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        k = bad[0]
        raise BadFileError(f"{path}: {k} has shape {tuple(sd[k].shape)}, the model expects {tuple(own[k].shape)} "
                             f"(wrong preset?); {len(bad)} mismatched tensors in all")

    assigned, missing, unexpected = _check_keys(path, vit, own, file, a, found, container)

    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {ACTIVATIONS}")
    configured = activation or _activation_of(vit)
    if file.activation and configured and file.activation != configured:
        raise BadFileError(f"{path}: the weights use {file.activation} ({file.activation_source}) but "
                             f"model.activation={configured}; set model.activation={file.activation}")

    result = vit.load_state_dict(sd, strict=False)
    log.info("pretrained %s: %s; loaded %d backbone tensors, %d expected missing (FRM experts/routers), "
             "%d ignored (%d FRM-block MLP, %d non-visual CLIP); activation %s", path, found, len(assigned),
             len(missing), len(unexpected) + len(a.ignored), len(unexpected), len(a.ignored),
             f"{configured or file.activation} ({file.activation_source})" if file.activation else configured)
    if not file.activation:
        log.info("pretrained %s: the file does not record its activation; using %s, set by model.activation "
                 "(OpenAI CLIP weights need quick_gelu, most others, e.g. LAION's, gelu)", path, configured)
    return list(result.missing_keys), list(result.unexpected_keys)
