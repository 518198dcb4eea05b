import pytest

from mfrnet_ds import ConfigError, load_config
from mfrnet_ds.config import check, derive_batch


def test_defaults_are_the_paper_recipe():
    cfg = load_config()
    assert cfg.model.frm.num_experts == 6 and cfg.model.ffm.num_experts == 3
    assert cfg.model.frm.blocks == [-1]
    assert cfg.loss.id_weight == 0.25 and cfg.loss.label_smoothing == 0.1 and cfg.loss.triplet_weight == 1.0
    assert cfg.model.frm.aux_weight == 0.01 and cfg.model.ffm.aux_weight == 0.01


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("model:\n  preset: small\n  frm:\n    num_experts: 8\ntrain:\n  epochs: 3\n")
    cfg = load_config(f, ["model.frm.ep_size=4", "model.img_size=[128, 256]", "optim.lr=1e-3"])
    assert cfg.model.preset == "small" and cfg.model.frm.num_experts == 8 and cfg.model.frm.ep_size == 4
    assert cfg.model.img_size == (128, 256) and cfg.optim.lr == 1e-3 and cfg.train.epochs == 3


@pytest.mark.parametrize("override, words", [
    (["model.frm.num_expert=4"], ["model.frm.num_expert", "num_experts"]),
    (["trian.epochs=3"], ["trian", "train"]),
    (["model.frm.num_experts=six"], ["model.frm.num_experts", "'six'", "integer"]),
    (["model.frm.top_k=1.5"], ["model.frm.top_k", "integer"]),
    (["model.frm.router=dot"], ["model.frm.router", "'cosine'", "'linear'"]),
    (["model.frm.ep_size=4"], ["model.frm.ep_size=4", "num_experts=6", "1, 2, 3, 6"]),
    (["model.ffm.ep_size=2"], ["model.ffm.ep_size=2", "num_experts=3"]),
    (["train.global_batch=60", "data.num_instances=8"], ["train.global_batch=60", "data.num_instances=8"]),
    (["model.preset=huge"], ["model.preset", "tiny", "base"]),
    (["model.img_size=[250,128]"], ["model.img_size[0]=250", "16"]),
    (["model.frm.blocks=[4]"], ["model.frm.blocks[0]=4", "-4..3"]),
    (["model.frm"], ["model.frm", "key=value"]),
])
def test_errors_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_missing_file_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_world_size_checks():
    cfg = load_config(None, ["model.frm.ep_size=2"])
    with pytest.raises(ConfigError, match="model.frm.ep_size=2 does not divide the world size 3"):
        check(cfg, world_size=3)
    check(cfg, world_size=4)


def test_batch_derivation_and_conflicts():
    cfg = load_config(None, ["train.global_batch=64", "data.num_instances=8"])
    assert derive_batch(cfg, 2) == (32, 1)
    cfg = load_config(None, ["train.global_batch=64", "data.num_instances=8", "train.grad_accum=2"])
    assert derive_batch(cfg, 2) == (16, 2)
    cfg = load_config(None, ["train.global_batch=64", "data.num_instances=8", "train.micro_batch=8"])
    assert derive_batch(cfg, 4) == (8, 2)
    cfg = load_config(None, ["train.global_batch=64", "data.num_instances=8", "train.micro_batch=8",
                             "train.grad_accum=2"])
    with pytest.raises(ConfigError, match=r"train.micro_batch=8 x train.grad_accum=2 x world 2 = 32"):
        derive_batch(cfg, 2)
    # The paper's 8 x 8 on 16 ranks: 4 samples per rank (half an identity), 8 identities per global micro batch.
    cfg = load_config(None, ["train.global_batch=64", "data.num_instances=8"])
    assert derive_batch(cfg, 16) == (4, 1)
    cfg = load_config(None, ["train.global_batch=64", "data.num_instances=16"])
    assert derive_batch(cfg, 8) == (8, 1)        # RGBNT100's 4 x 16 on 8 ranks
    cfg = load_config(None, ["train.global_batch=64", "data.num_instances=16", "train.grad_accum=4"])
    with pytest.raises(ConfigError, match=r"global micro batch of 16 .*fewer than 2 .*train.grad_accum in \{1, 2\}"):
        derive_batch(cfg, 2)   # 64 / 4 = 16 = one identity per micro step: no triplet
    cfg = load_config(None, ["train.global_batch=48", "data.num_instances=16", "train.grad_accum=2"])
    with pytest.raises(ConfigError, match=r"global micro batch of 24 .*not whole identities"):
        derive_batch(cfg, 2)   # 3 identities of 16 split over 2 micro steps
    cfg = load_config(None, ["train.global_batch=64", "data.num_instances=8"])
    with pytest.raises(ConfigError, match=r"train.global_batch=64 is not divisible by .* world size 3"):
        derive_batch(cfg, 3)


def test_saved_config_is_the_base_and_overrides_go_on_top():
    """launch/evaluate.py's route: the checkpoint's config, its key=value overrides, the saved dict untouched."""
    from mfrnet_ds.config import config_from_saved
    saved = load_config(None, ["data.eval_batch=32", "model.pretrained=/some/ViT-B-16.pt"]).to_dict()
    cfg = config_from_saved(saved, ["data.eval_batch=16", "data.re_ranking=true"])
    assert cfg.data.eval_batch == 16 and cfg.data.re_ranking is True and cfg.model.pretrained == ""
    assert saved["data"]["eval_batch"] == 32 and config_from_saved(saved).data.eval_batch == 32
    with pytest.raises(ConfigError, match="unknown key data.eval_bach"):
        config_from_saved(saved, ["data.eval_bach=16"])
