"""Every shipped configuration loads and passes the checks: each model preset, each YAML in configs/, each DeepSpeed
JSON in ds_configs/; and the tiny preset with each YAML's model settings builds and runs a forward pass.

Parametrised over what is on disk, so a new preset, recipe or DeepSpeed file is covered without editing this file.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launcher import ROOT
from mfrnet_ds import build_model, load_config
from mfrnet_ds.config import ConfigError, check
from mfrnet_ds.engine.dist import deepspeed_config
from mfrnet_ds.presets import PRESETS

YAMLS = sorted((ROOT / "configs").glob("*.yaml"))
DS_JSONS = sorted((ROOT / "ds_configs").glob("*.json"))
# the paper recipes ask for a local CLIP file; a config check must not need one
NO_WEIGHTS = ["model.pretrained=none"]


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_the_lists_are_not_empty():
    assert len(PRESETS) >= 4 and len(YAMLS) >= 4 and len(DS_JSONS) >= 6


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_loads_and_checks(preset):
    cfg = load_config(None, [f"model.preset={preset}"])
    check(cfg, world_size=1)
    assert cfg.model.preset == preset
    with pytest.raises(ConfigError, match=r"model.frm.blocks\[0\]"):       # the depth comes from the preset
        load_config(None, [f"model.preset={preset}", f"model.frm.blocks=[{PRESETS[preset].depth}]"])


@pytest.mark.parametrize("yaml", YAMLS, ids=ids(YAMLS))
def test_every_yaml_loads_and_checks(yaml):
    cfg = load_config(yaml, NO_WEIGHTS)
    assert cfg.name == yaml.stem
    for world in (2, 8):        # a CPU demo pair and a GPU node
        check(cfg, world_size=world)


@pytest.mark.parametrize("yaml", [y for y in YAMLS if "required" in y.read_text()], ids=lambda y: y.name)
def test_recipes_that_need_weights_say_so(yaml):
    with pytest.raises(ConfigError, match="model.pretrained=required"):
        load_config(yaml)


@pytest.mark.parametrize("ds_json", DS_JSONS, ids=ids(DS_JSONS))
def test_every_deepspeed_json_accepted_for_the_demo(ds_json):
    cfg = load_config(ROOT / "configs/demo.yaml")
    ds = deepspeed_config(cfg, world_size=2, path=str(ds_json))
    # demo: global batch 32 over 2 ranks, no accumulation
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) \
        == (32, 16, 1)
    assert ds["zero_optimization"]["stage"] in (0, 1, 2)


def small_size(cfg) -> tuple[int, int]:
    """The recipe's orientation (persons tall, vehicles wide) at the smallest patch grid that keeps it."""
    h, w = cfg.model.img_size
    return (64, 32) if h > w else (32, 64) if w > h else (32, 32)


@pytest.mark.parametrize("yaml", YAMLS, ids=ids(YAMLS))
def test_tiny_preset_forward_with_each_yamls_model(yaml):
    cfg = load_config(yaml, NO_WEIGHTS)
    size = small_size(cfg)
    # one process: expert parallelism off (its all-to-all needs a group); the rest of the model as the recipe
    cfg = load_config(yaml, [*NO_WEIGHTS, "model.preset=tiny", f"model.img_size=[{size[0]},{size[1]}]",
                             "model.num_classes=4", "model.frm.ep_size=1", "model.ffm.ep_size=1"])
    model = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 3, *size, generator=gen)
    camids = torch.tensor([0, cfg.model.num_cameras - 1])
    with torch.no_grad():
        out = model(images, camids)
    dim = 3 * PRESETS["tiny"].proj_dim
    assert out.embedding.shape == (2, dim) and torch.isfinite(out.embedding).all()
    assert len(out.features) == (1 if cfg.model.head == "concat" else 3)
    assert all(torch.isfinite(f).all() for f in out.features)
