"""Pretrained loading round trips through files this test writes: timm format, OpenAI CLIP state dict, and
OpenAI's TorchScript archive."""
import pytest
import torch
from torch import nn

from mfrnet_ds import build_model, load_config
from mfrnet_ds.model.backbone import build_vit
from mfrnet_ds.model.presets import PRESETS


def source_vit():
    """A 'pretrained' tiny tower at CLIP's 224x224 (14x14 grid), with recognisable weights."""
    torch.manual_seed(123)
    vit = build_vit(PRESETS["tiny"], (224, 224))
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_()
    return vit


def to_openai(sd):
    """Our timm keys -> OpenAI CLIP visual keys (the inverse of what the loader must undo)."""
    out = {}
    for k, v in sd.items():
        if k == "head.bias":
            continue
        if k == "head.weight":
            out["proj"] = v.t().contiguous()
            continue
        if k == "cls_token":
            out["class_embedding"] = v.reshape(-1)
            continue
        if k == "pos_embed":
            out["positional_embedding"] = v[0]
            continue
        k = (k.replace("patch_embed.proj", "conv1").replace("norm_pre", "ln_pre").replace("blocks.", "transformer.resblocks.")
             .replace("norm1", "ln_1").replace("norm2", "ln_2").replace("attn.qkv.", "attn.in_proj_")
             .replace("attn.proj", "attn.out_proj").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
        k = "ln_post" + k[4:] if k.startswith("norm.") else k
        out[k] = v
    return {f"visual.{k}": v for k, v in out.items()}


def torchscript_archive(sd, path):
    root = nn.Module()
    for key, value in sd.items():
        node = root
        *parents, leaf = key.split(".")
        for name in parents:
            if not hasattr(node, name):
                node.add_module(name, nn.Module())
            node = getattr(node, name)
        node.register_parameter(leaf, nn.Parameter(value.clone()))
    torch.jit.save(torch.jit.script(root), str(path))


@pytest.mark.parametrize("fmt", ["timm", "openai_state_dict", "openai_torchscript"])
def test_round_trip(tmp_path, fmt, caplog):
    src = source_vit()
    sd = src.state_dict()
    path = tmp_path / f"weights_{fmt}.pt"
    if fmt == "timm":
        torch.save({"state_dict": sd}, path)
    elif fmt == "openai_state_dict":
        torch.save(to_openai(sd), path)
    else:
        torchscript_archive(to_openai(sd), path)
    cfg = load_config(None, ["model.img_size=[64,32]", f"model.pretrained={path}"])
    with caplog.at_level("WARNING"):
        model = build_model(cfg)
    got = model.vit.state_dict()
    for key in ["patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
                "blocks.2.mlp.fc2.weight", "norm_pre.weight", "norm.bias", "head.weight"]:
        assert torch.equal(got[key], sd[key]), key
    # 14x14 grid resampled to 4x2; the CLS position is kept as is
    assert got["pos_embed"].shape == (1, 1 + 8, 64)
    assert torch.equal(got["pos_embed"][0, 0], sd["pos_embed"][0, 0])
    # the FRM block's MLP has no place in the model: reported, not silently dropped
    assert "blocks.3.mlp.fc1.weight" in caplog.text


def test_wrong_preset_is_a_clear_error(tmp_path):
    torch.save(build_vit(PRESETS["small"], (64, 32)).state_dict(), tmp_path / "small.pt")
    cfg = load_config(None, ["model.img_size=[64,32]", f"model.pretrained={tmp_path / 'small.pt'}"])
    with pytest.raises(ValueError, match=r"cls_token has shape \(1, 1, 384\).*wrong preset"):
        build_model(cfg)


def test_missing_file_is_named(tmp_path):
    cfg = load_config(None, ["model.img_size=[64,32]", f"model.pretrained={tmp_path / 'none.pt'}"])
    with pytest.raises(FileNotFoundError, match="none.pt"):
        build_model(cfg)
