"""The DeepSpeed JSON holds engine settings only: a key the experiment config owns never silently wins."""
import json
from pathlib import Path

import pytest

from mfrnet_ds.config import ConfigError, load_config
from mfrnet_ds.engine.dist import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]


def _json(tmp_path, **keys) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 0}, **keys}))
    return str(path)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "ds_configs").glob("*.json")))
def test_shipped_jsons_pass_and_get_the_config_values(name):
    config = load_config(None, ["train.global_batch=16", "data.num_instances=4", "optim.grad_clip=0.5"])
    ds = deepspeed_config(config, 2, str(ROOT / "ds_configs" / name))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (16, 8, 1)
    assert ds["gradient_clipping"] == 0.5


@pytest.mark.parametrize("key, value, owner", [
    ("gradient_clipping", 1.0, "optim.grad_clip"),          # the config says 0 (off): the JSON must not turn it on
    ("train_batch_size", 32, "train.global_batch"),
    ("gradient_accumulation_steps", 2, "train.grad_accum"),
    ("optimizer", {"type": "AdamW", "params": {"lr": 1e-3}}, "optim"),
    ("scheduler", {"type": "WarmupLR"}, "optim.schedule"),
])
def test_a_key_the_config_owns_with_another_value_names_file_key_and_setting(tmp_path, key, value, owner):
    config = load_config(None, ["train.global_batch=16", "data.num_instances=4"])
    path = _json(tmp_path, **{key: value})
    with pytest.raises(ConfigError) as e:
        deepspeed_config(config, 1, path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: {key}=") and f"set {owner}" in message


def test_owned_keys_that_agree_or_say_auto_are_accepted(tmp_path):
    config = load_config(None, ["train.global_batch=16", "data.num_instances=4", "optim.grad_clip=2.0"])
    path = _json(tmp_path, gradient_clipping=2.0, train_batch_size="auto", gradient_accumulation_steps=1)
    ds = deepspeed_config(config, 2, path)
    assert ds["gradient_clipping"] == 2.0 and ds["train_batch_size"] == 16
    off = load_config(None, ["train.global_batch=16", "data.num_instances=4"])
    assert "gradient_clipping" not in deepspeed_config(off, 1, _json(tmp_path, gradient_clipping="auto"))
