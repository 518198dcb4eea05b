"""Pretrained loading through files this test writes with random weights: timm format, OpenAI CLIP state
dict, OpenAI's TorchScript archive and an open_clip training checkpoint; and the strict checks (wrong file,
missing/extra tensors, activation contradictions)."""
import argparse
import logging

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mfrnet_ds import build_model, load_config
from mfrnet_ds.model.backbone import build_vit, load_pretrained
from mfrnet_ds.presets import PRESETS

LOGGER = "mfrnet_ds.model.backbone"


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


def text_tower():
    """A stand-in for the rest of a CLIP file: text tower and logit scale (never read)."""
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(shape, generator=g) for k, shape in {
        "positional_embedding": (77, 32), "token_embedding.weight": (100, 32), "text_projection": (32, 32),
        "transformer.resblocks.0.attn.in_proj_weight": (96, 32), "ln_final.weight": (32,), "logit_scale": ()}.items()}


def open_clip_training_checkpoint(sd):
    """What open_clip's training script saves: the DDP-wrapped CLIP model's state dict and training state."""
    clip = {**to_openai(sd), **text_tower()}
    return {"epoch": 10, "name": "laion-run", "state_dict": {f"module.{k}": v for k, v in clip.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0, 1]}]}}


def config(path, *overrides, size=(64, 32)):
    return load_config(None, [f"model.img_size=[{size[0]},{size[1]}]", f"model.pretrained={path}", *overrides])


def backbone_warnings(caplog):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


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
    with caplog.at_level("INFO", logger=LOGGER):
        model = build_model(config(path))
    got = model.vit.state_dict()
    for key in ["patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
                "blocks.2.mlp.fc2.weight", "norm_pre.weight", "norm.bias", "head.weight"]:
        assert torch.equal(got[key], sd[key]), key
    # 14x14 grid resampled to 4x2; the CLS position is kept as is
    assert got["pos_embed"].shape == (1, 1 + 8, 64)
    assert torch.equal(got["pos_embed"][0, 0], sd["pos_embed"][0, 0])
    # the FRM block's MLP has no place in the model: expected, counted in the summary, no warnings
    assert "4 ignored (4 FRM-block MLP, 0 non-visual CLIP)" in caplog.text
    assert not backbone_warnings(caplog)


def test_open_clip_training_checkpoint_sets_every_backbone_tensor(tmp_path, caplog):
    sd = source_vit().state_dict()
    path = tmp_path / "epoch_10.pt"
    torch.save(open_clip_training_checkpoint(sd), path)
    cfg = config(path, size=(224, 224))  # CLIP's grid: the position embedding is taken as is
    scratch = build_model(config("none", size=(224, 224))).vit.state_dict()
    with caplog.at_level("INFO", logger=LOGGER):
        got = build_model(cfg).vit.state_dict()
    expected = dict(sd, **{"head.bias": torch.zeros_like(sd["head.bias"])})  # CLIP's projection has no bias
    moe = [k for k in got if ".moe." in k]
    assert moe and all(k.startswith("blocks.3.mlp.moe.") for k in moe)
    for key, value in got.items():
        if key in moe:  # the FRM experts and routers keep their initialisation
            assert torch.equal(value, scratch[key]), key
            continue
        assert torch.equal(value, expected[key]), key
        if key != "head.bias":  # zero both before and after
            assert not torch.equal(value, scratch[key]), key
    assert "'module.' prefix stripped" in caplog.text
    assert f"loaded {len(got) - len(moe)} backbone tensors" in caplog.text
    assert "10 ignored (4 FRM-block MLP, 6 non-visual CLIP)" in caplog.text
    # no record of the activation in such a checkpoint: one info line says what is used and where it is set
    assert "does not record its activation; using quick_gelu, set by model.activation" in caplog.text
    assert not backbone_warnings(caplog)


def test_return_value_lists_only_the_expected_differences(tmp_path):
    sd = source_vit().state_dict()
    path = tmp_path / "clip.pt"
    torch.save({**to_openai(sd), **text_tower()}, path)
    model = build_model(load_config(None, ["model.img_size=[64,32]", "model.frm.blocks=[0,-1]"]))
    missing, unexpected = load_pretrained(model.vit, path)
    assert missing and all(k.startswith(("blocks.0.mlp.moe.", "blocks.3.mlp.moe.")) for k in missing)
    assert sorted(unexpected) == sorted(f"blocks.{i}.mlp.{fc}.{p}" for i in (0, 3) for fc in ("fc1", "fc2")
                                        for p in ("weight", "bias"))


def other_files(tmp_path):
    sd = source_vit().state_dict()
    torchvision = pytest.importorskip("torchvision")
    return {
        "resnet18.pt": torchvision.models.resnet18(weights=None).state_dict(),
        "unrelated.pt": {"encoder.layer.0.weight": torch.randn(4, 4), "decoder.bias": torch.randn(4)},
        # open_clip with a timm trunk as its image tower: `visual.*`, but nothing of a CLIP ViT
        "timm_trunk_clip.pt": {**{f"visual.trunk.{k}": v for k, v in sd.items()}, **text_tower()},
    }


@pytest.mark.parametrize("name", ["resnet18.pt", "unrelated.pt", "timm_trunk_clip.pt"])
def test_file_without_our_tensors_is_an_error(tmp_path, name):
    path = tmp_path / name
    torch.save({"state_dict": other_files(tmp_path)[name]}, path)
    with pytest.raises(ValueError, match=rf"{name}: none of its tensors belongs to this backbone") as e:
        build_model(config(path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change, named", [
    ("drop visual.ln_post.weight", r"1 backbone tensors missing \(norm.weight \(visual.ln_post.weight\)\)"),
    ("drop visual.transformer.resblocks.1.mlp.c_fc.bias", r"1 backbone tensors missing \(blocks.1.mlp.fc1.bias "),
    ("add visual.transformer.resblocks.0.ls_1.gamma",
     r"0 backbone tensors missing, 1 unexpected tensors \(visual.transformer.resblocks.0.ls_1.gamma\)"),
])
def test_one_tensor_off_is_an_error_naming_it(tmp_path, change, named):
    op, key = change.split()
    clip = to_openai(source_vit().state_dict())
    if op == "drop":
        del clip[key]
    else:
        clip[key] = torch.ones(64)
    path = tmp_path / "clip.pt"
    torch.save(clip, path)
    model = build_model(load_config(None, ["model.img_size=[64,32]"]))
    before = {k: v.clone() for k, v in model.vit.state_dict().items()}
    with pytest.raises(ValueError, match=rf"clip.pt: does not fit this backbone.*{named}") as e:
        load_pretrained(model.vit, path)
    assert "\n" not in str(e.value)
    # nothing was loaded: the error leaves the model as it was
    assert all(torch.equal(v, before[k]) for k, v in model.vit.state_dict().items())


@pytest.mark.parametrize("arch, named", [
    (dict(pre_norm=False, depth=4), r"2 backbone tensors missing \(norm_pre.weight, norm_pre.bias\)"),
    (dict(pre_norm=True, depth=5), r"0 backbone tensors missing, 12 unexpected tensors \(blocks.4.norm1.weight, "),
])
def test_other_vit_architecture_is_an_error(tmp_path, arch, named):
    other = VisionTransformer(img_size=224, patch_size=16, embed_dim=64, num_heads=4, num_classes=32,
                              global_pool="token", act_layer="quick_gelu", **arch)
    torch.save(other.state_dict(), tmp_path / "other_vit.pt")
    with pytest.raises(ValueError, match=rf"other_vit.pt: does not fit this backbone.*{named}"):
        build_model(config(tmp_path / "other_vit.pt"))


def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pt: not a PyTorch checkpoint"):
        build_model(config(tmp_path / "garbage.pt"))


def test_openai_torchscript_contradicting_gelu_is_an_error(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    torchscript_archive({**to_openai(source_vit().state_dict()), **text_tower()}, path)
    with pytest.raises(ValueError, match=r"ViT-B-16.pt: the weights use quick_gelu \(the file is OpenAI's CLIP "
                                         r"TorchScript archive\) but model.activation=gelu; set model.activation="
                                         r"quick_gelu"):
        build_model(config(path, "model.activation=gelu"))
    # the configured value given explicitly wins over the model's own activation
    model = build_model(load_config(None, ["model.img_size=[64,32]"]))
    with pytest.raises(ValueError, match="model.activation=gelu"):
        load_pretrained(model.vit, path, activation="gelu")
    load_pretrained(model.vit, path, activation="quick_gelu")


@pytest.mark.parametrize("record, file_says", [
    ({"model_cfg": {"embed_dim": 32, "quick_gelu": False, "vision_cfg": {}}}, "gelu"),
    ({"model_cfg": {"embed_dim": 32, "quick_gelu": True, "vision_cfg": {}}}, "quick_gelu"),
    ({"arch": "vit_base_patch16_clip_quickgelu_224", "args": argparse.Namespace(model="vit_base_patch16_clip_"
                                                                                      "quickgelu_224", lr=1e-3)},
     "quick_gelu"),
    ({"arch": "vit_base_patch16_clip_224", "args": argparse.Namespace(model="vit_base_patch16_clip_224")}, "gelu"),
])
def test_checkpoint_recording_its_activation_is_checked(tmp_path, caplog, record, file_says):
    sd = source_vit().state_dict()
    clip = "model_cfg" in record
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 1, **record, "state_dict": {**to_openai(sd), **text_tower()} if clip else sd}, path)
    other = {"gelu": "quick_gelu", "quick_gelu": "gelu"}[file_says]
    with pytest.raises(ValueError, match=rf"ckpt.pt: the weights use {file_says} .* but model.activation={other}"):
        build_model(config(path, f"model.activation={other}"))
    with caplog.at_level("INFO", logger=LOGGER):
        model = build_model(config(path, f"model.activation={file_says}"))
    assert torch.equal(model.vit.state_dict()["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    assert f"activation {file_says} (its " in caplog.text
    assert "does not record its activation" not in caplog.text


def test_unrecorded_activation_follows_the_config(tmp_path, caplog):
    src = source_vit()
    torch.save(src.state_dict(), tmp_path / "laion.pt")
    with caplog.at_level("INFO", logger=LOGGER):
        model = build_model(config(tmp_path / "laion.pt", "model.activation=gelu"))
    assert type(model.vit.blocks[0].mlp.act).__name__ == "GELU"
    assert "does not record its activation; using gelu, set by model.activation" in caplog.text


def test_wrong_preset_is_a_clear_error(tmp_path):
    torch.save(build_vit(PRESETS["small"], (64, 32)).state_dict(), tmp_path / "small.pt")
    cfg = load_config(None, ["model.img_size=[64,32]", f"model.pretrained={tmp_path / 'small.pt'}"])
    with pytest.raises(ValueError, match=r"cls_token has shape \(1, 1, 384\).*wrong preset"):
        build_model(cfg)


def test_missing_file_is_named(tmp_path):
    cfg = load_config(None, ["model.img_size=[64,32]", f"model.pretrained={tmp_path / 'none.pt'}"])
    with pytest.raises(FileNotFoundError, match="none.pt"):
        build_model(cfg)
