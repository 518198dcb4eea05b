"""One typed configuration for a run: model, data, loss, optimiser, training, tracking.

A run is described by a YAML file (see `configs/`) plus dotted `key=value` overrides, e.g.
`model.frm.num_experts=8 train.epochs=3`. Everything is checked before any work starts: unknown keys,
wrong types and MoE/batch settings that cannot work fail with a `ConfigError` naming the key, the
value and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

import yaml

from mfrnet_ds.errors import BadFileError, ConfigError, MissingFileError, UserError
from mfrnet_ds.presets import PRESETS
from mfrnet_ds.typed import build as _build, set_dotted as _set_dotted

__all__ = ["UserError", "MissingFileError", "BadFileError", "ConfigError", "Config", "load_config",
           "config_from_saved", "check", "derive_batch", "fit_expert_parallel", "expert_hidden", "MODALITIES"]

# the three aligned images of every sample, in the order shards, loaders and the model index them
MODALITIES = ("rgb", "nir", "tir")


@dataclass
class MoEConfig:
    """Settings shared by both MoE kinds (generation experts and representation experts)."""
    num_experts: int = 6
    hidden: Optional[int] = None      # expert hidden width; None -> a fixed ratio of the backbone width
    dropout: float = 0.1
    router: Literal["cosine", "linear"] = "cosine"
    router_dim: int = 256             # cosine router: the space tokens are projected to (Tutel's 256)
    top_k: int = 1
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True          # training: tokens over an expert's capacity are dropped
    eval_drop_tokens: bool = False    # evaluation: off, so an embedding never depends on its batch-mates
    # training-time routing noise: "normal" adds N(0, (gate_noise_scale / num_experts)^2) to the router logits
    # (the paper's Tutel setting, gate_noise 1.0); RSample (Gumbel) and Jitter are DeepSpeed's policies
    gate_noise: Literal["none", "normal", "RSample", "Jitter"] = "normal"
    gate_noise_scale: float = 1.0
    aux_weight: float = 0.01          # per MoE layer, as the paper intends (the reference used 12x this)
    # load-balancing loss: "switch" = DeepSpeed's E * sum(fraction routed x mean gate); "tutel" = Tutel's
    # importance + load loss (CV^2 / 2 each), the loss the reference trains with
    aux_loss: Literal["switch", "tutel"] = "switch"
    # which tokens an expert over capacity keeps: "random" (DeepSpeed's random token selection) or
    # "priority" (the highest-scoring tokens: Tutel's batch-prioritised routing, as the reference)
    overflow: Literal["random", "priority"] = "random"
    ep_size: int = 1                  # expert-parallel ranks the experts of one layer are spread over


@dataclass
class FFMConfig(MoEConfig):
    """Feature Fusion Module: two generators (A: RGB and NIR targets, B: TIR targets)."""
    enabled: bool = True
    num_experts: int = 3


@dataclass
class FRMConfig(MoEConfig):
    """Feature Representation Module: MoE replacing the MLP of the listed blocks (negative = from the end)."""
    blocks: list[int] = field(default_factory=lambda: [-1])


@dataclass
class ModelConfig:
    preset: str = "tiny"
    img_size: tuple[int, int] = (256, 128)   # (H, W): 256x128 persons, 128x256 vehicles
    num_cameras: int = 4                     # the trainer takes both counts from the shard manifest
    num_classes: Optional[int] = None        # training identities; None = no classifier (inference)
    sie_coef: float = 1.0
    head: Literal["concat", "per_modality"] = "concat"
    # per-modality heads only: the feature of a modality is its projected CLS ("cls", the reference's MSVR310)
    # or [CLS; mean of patch tokens] -> LayerNorm -> Linear -> QuickGELU ("cls_mean", its RGBNT100)
    head_pool: Literal["cls", "cls_mean"] = "cls_mean"
    drop_path: float = 0.0
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"   # the backbone MLPs: OpenAI CLIP uses QuickGELU
    # local file: OpenAI CLIP (.pt / visual.* keys), an open_clip checkpoint or timm format; "none" (or "")
    # trains from scratch; "required" (the paper recipes) stops with a message until a file is given
    pretrained: str = ""
    # ablation only: train as the released reference code does (every expert of a layer shares one weight
    # set, the FFM aux loss counted once per block, the raw weight-head score on the `nt` missing path)
    reference_mode: bool = False
    ffm: FFMConfig = field(default_factory=FFMConfig)
    frm: FRMConfig = field(default_factory=FRMConfig)


@dataclass
class DataConfig:
    # folder written by shards/build.py (holds manifest.json), or the same files remote: http(s)://HOST/PATH,
    # or pipe:CMD with {name} where a file name goes (pipe:aws s3 cp s3://b/shards/{name} -): stream/source.py
    shards: str = ""
    num_instances: int = 8                   # K of the P x K identity-balanced batch
    num_workers: int = 2
    aligned_augment: bool = True             # one flip/crop/erase draw for the three aligned images
    # a loader stream emits a batch once its pool holds pool_factor x P identities: larger mixes more shards
    # into each batch, at pool_factor x the memory of a batch per stream
    pool_factor: int = 4
    eval_batch: int = 64
    re_ranking: bool = False                 # k-reciprocal re-ranking of the distances at evaluation
    max_damaged_share: float = 0.05          # evaluation fails when more of a split than this is undecodable


@dataclass
class LossConfig:
    id_weight: float = 0.25
    label_smoothing: float = 0.1
    triplet_weight: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 3.5e-4                      # new modules (MoE, weight heads, neck, classifier)
    backbone_lr: float = 5e-6               # pretrained CLIP tower
    weight_decay: float = 1e-4
    eps: float = 1e-8                       # Adam's epsilon
    bias_lr_factor: float = 2.0
    # which parameters get bias_lr_factor: "head" = the biases of the head modules only (camera embedding, necks,
    # token reductions), as the reference's optimiser; "all_1d" = every 1-D parameter (biases and norm gains) of
    # every role, which a model trained from scratch learns faster with (the demo)
    bias_lr_scope: Literal["head", "all_1d"] = "head"
    # "cosine": per-step warm-up from warmup_factor x each group's lr, then cosine to min_lr_factor x its lr.
    # "reference": the released code's per-epoch schedule (see engine/optim.py): warm-up from the absolute
    # warmup_factor x lr for every group, cosine over all epochs to the absolute min_lr_factor x lr, and
    # each epoch's lr scaled by a seeded, truncated normal perturbation
    schedule: Literal["cosine", "reference"] = "cosine"
    warmup_epochs: int = 10
    warmup_factor: float = 0.1              # warm-up starts at this fraction of the lr
    min_lr_factor: float = 0.001            # cosine floor as a fraction of the lr
    lr_noise: float = 0.67                  # reference schedule: |perturbation| < this (0 = none)
    lr_noise_seed: int = 42
    grad_clip: float = 0.0                  # 0 = off; passed to DeepSpeed's gradient_clipping


@dataclass
class TrainConfig:
    epochs: int = 45
    global_batch: int = 64                  # P x K identities x instances, summed over all ranks
    micro_batch: Optional[int] = None       # per rank per forward; derived when None
    grad_accum: Optional[int] = None        # derived when None
    steps_per_epoch: Optional[int] = None   # None: train samples // global batch
    max_steps: Optional[int] = None         # stop (with a checkpoint) after this many steps in all
    log_every: int = 10
    eval_every: int = 5                     # epochs; the last epoch is always evaluated
    eval_first: bool = False                # also evaluate the untrained model (step 0)
    eval_missing: bool = True               # final evaluation adds the six missing-modality settings (RGBNT201)
    ckpt_every: int = 0                     # steps; 0 = at the end of every epoch only
    keep_last: int = 2                      # step checkpoints kept (older ones deleted); `best` is always kept
    seed: int = 0
    out_dir: str = "runs/default"
    on_nan: Literal["skip", "stop"] = "stop"
    eval_on_stop: bool = True               # a run stopped early (train.max_steps, SIGTERM) still evaluates
    deepspeed_config: str = "ds_configs/cpu.json"
    collective_timeout_s: float = 600.0     # a rank waiting longer than this on the others fails, never hangs
    # torch.compile the dense ViT blocks (MoE blocks stay eager): "auto" = on CUDA devices only (on the 2-core CPU
    # it did not pay: bench/RESULTS.md), "on", "off"
    compile: Literal["auto", "on", "off"] = "auto"
    # host memory: "reuse" keeps freed blocks for the next step (glibc mallopt, engine/malloc.py), "default" is
    # glibc's own behaviour, "auto" = reuse on CPU devices (faster CPU steps: bench/RESULTS.md)
    malloc: Literal["auto", "reuse", "default"] = "auto"


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = ""                    # default: the dataset name from the shard manifest
    run_name: str = ""
    uri: str = ""                           # default: MLFLOW_TRACKING_URI, else sqlite in out_dir (tracking/store.py)
    # while the store is unreachable (numbers go to OUT_DIR/mlflow_offline.jsonl), ask it again this often;
    # once it answers, the offline part is replayed into the run (tracking/mlflow.py)
    reconnect_s: float = 30.0
    system_metrics_interval: float = 10.0   # seconds between CPU/memory/GPU samples (system/ metrics)
    register_model: str = ""                # also register the logged model under this name ("": don't)


@dataclass
class Config:
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> typed dataclasses, with the key named in every error.

def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Read a YAML experiment file (or the defaults when `path` is None) and apply `key=value` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    _apply_overrides(data, overrides)
    config = _build(Config, data, "")
    check(config)
    return config


def config_from_saved(data: dict, overrides: typing.Iterable[str] = ()) -> Config:
    """The config stored in a checkpoint or an exported model, with `key=value` overrides on top (e.g. an
    evaluation's data.eval_batch). Pretrained weights are not reloaded: the file holds every weight."""
    data = copy.deepcopy(data)
    _apply_overrides(data, overrides)
    config = _build(Config, data, "")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, pretrained=""))


def _apply_overrides(data: dict, overrides: typing.Iterable[str]) -> None:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted key=value, e.g. model.frm.num_experts=8")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")


# ---------------------------------------------------------------------------------------------
# Checks that need more than one value.

def check(config: Config, world_size: int | None = None) -> None:
    """Fail on settings that cannot work; with `world_size`, also the ones that depend on it."""
    m = config.model
    if m.preset not in PRESETS:
        raise ConfigError(f"model.preset={m.preset!r}: expected one of {', '.join(sorted(PRESETS))}")
    depth = PRESETS[m.preset].depth
    for i, h in enumerate(m.img_size):
        if h <= 0 or h % 16:
            raise ConfigError(f"model.img_size[{i}]={h}: expected a positive multiple of the patch size 16")
    if m.pretrained == "required":
        raise ConfigError("model.pretrained=required: this recipe fine-tunes pretrained CLIP weights; give a local "
                          "file (model.pretrained=/path/ViT-B-16.pt) or model.pretrained=none to train from scratch")
    if m.num_cameras < 1:
        raise ConfigError(f"model.num_cameras={m.num_cameras}: expected >= 1")
    for i, b in enumerate(m.frm.blocks):
        if not -depth <= b < depth:
            raise ConfigError(f"model.frm.blocks[{i}]={b}: preset {m.preset!r} has {depth} blocks "
                              f"(allowed {-depth}..{depth - 1})")
    for name, moe in (("model.ffm", m.ffm), ("model.frm", m.frm)):
        _check_moe(name, moe, world_size)
        if m.reference_mode and moe.ep_size > 1:
            raise ConfigError(f"model.reference_mode=true shares one expert weight set per layer, which cannot be "
                              f"split over ranks: set {name}.ep_size=1 (got {moe.ep_size})")

    t = config.train
    k = config.data.num_instances
    if k < 1:
        raise ConfigError(f"data.num_instances={k}: expected >= 1")
    if config.data.pool_factor < 1:
        raise ConfigError(f"data.pool_factor={config.data.pool_factor}: expected >= 1")
    if t.global_batch % k:
        raise ConfigError(f"train.global_batch={t.global_batch} is not divisible by data.num_instances={k}: "
                          f"a batch is P identities x K instances")
    if t.epochs < 1:
        raise ConfigError(f"train.epochs={t.epochs}: expected >= 1")
    if t.keep_last < 1:
        raise ConfigError(f"train.keep_last={t.keep_last}: expected >= 1 (the checkpoint just saved is one)")
    if not config.tracking.system_metrics_interval > 0:
        raise ConfigError(f"tracking.system_metrics_interval={config.tracking.system_metrics_interval}: expected "
                          "seconds > 0")
    if world_size is not None:
        derive_batch(config, world_size)


def _check_moe(name: str, moe: MoEConfig, world_size: int | None) -> None:
    if moe.num_experts < 1:
        raise ConfigError(f"{name}.num_experts={moe.num_experts}: expected >= 1")
    if moe.ep_size < 1 or moe.num_experts % moe.ep_size:
        raise ConfigError(f"{name}.ep_size={moe.ep_size}: must divide {name}.num_experts={moe.num_experts} "
                          f"(allowed: {', '.join(str(d) for d in _divisors(moe.num_experts))})")
    if moe.router_dim < 1:
        raise ConfigError(f"{name}.router_dim={moe.router_dim}: expected >= 1")
    if not 1 <= moe.top_k <= moe.num_experts:
        raise ConfigError(f"{name}.top_k={moe.top_k}: expected 1..{name}.num_experts ({moe.num_experts})")
    if moe.capacity_factor <= 0 or moe.eval_capacity_factor <= 0:
        raise ConfigError(f"{name}: capacity factors must be > 0")
    if world_size is not None and world_size % moe.ep_size:
        raise ConfigError(f"{name}.ep_size={moe.ep_size} does not divide the world size {world_size} "
                          f"(allowed: {', '.join(str(d) for d in _divisors(world_size))})")


def fit_expert_parallel(config: Config, world_size: int) -> tuple[Config, list[str]]:
    """The config with each MoE's ep_size lowered to gcd(ep_size, world_size), and what changed.

    For inference on another number of processes than the checkpoint was trained on (launch/evaluate.py):
    expert files are keyed by global expert index, so any ep_size that divides both the experts and the
    world loads them, exactly as `--resume` re-shards. The gcd divides num_experts because ep_size does.
    """
    m, changed = config.model, []
    for name in ("ffm", "frm"):
        moe = getattr(m, name)
        ep = math.gcd(moe.ep_size, world_size)
        if ep != moe.ep_size:
            changed.append(f"model.{name}.ep_size {moe.ep_size} -> {ep}")
            m = replace(m, **{name: replace(moe, ep_size=ep)})
    return replace(config, model=m), changed


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def derive_batch(config: Config, world_size: int) -> tuple[int, int]:
    """Return (micro_batch, grad_accum) with global = micro x accum x world; fail clearly on a conflict.

    Losses and BNNeck see the global micro batch (micro x world, gathered over the ranks), so that is what
    must hold whole identities, at least two of them; a rank's own micro batch may hold part of one.
    """
    t = config.train
    k = config.data.num_instances
    g = t.global_batch
    if g % world_size:
        raise ConfigError(f"train.global_batch={g} is not divisible by the data-parallel world size {world_size} "
                          f"(world sizes that work: {', '.join(str(d) for d in _divisors(g) if d <= 4096)})")
    per_rank = g // world_size
    micro, accum = t.micro_batch, t.grad_accum
    if micro is None and accum is None:
        accum = 1
    if micro is None:
        if accum <= 0 or per_rank % accum:
            raise ConfigError(f"train.grad_accum={accum}: global batch {g} / world {world_size} = {per_rank} "
                              f"per rank is not divisible by it (allowed: {_list(_divisors(per_rank))})")
        micro = per_rank // accum
    elif accum is None:
        if micro <= 0 or per_rank % micro:
            raise ConfigError(f"train.micro_batch={micro}: must divide the per-rank batch {per_rank} "
                              f"(global {g} / world {world_size}; allowed: {_list(_divisors(per_rank))})")
        accum = per_rank // micro
    if micro * accum * world_size != g:
        raise ConfigError(f"train.micro_batch={micro} x train.grad_accum={accum} x world {world_size} = "
                          f"{micro * accum * world_size}, but train.global_batch={g}")
    global_micro = micro * world_size
    if global_micro % k or global_micro < 2 * k:
        good = [a for a in _divisors(per_rank) if (g // a) % k == 0 and g // a >= 2 * k]
        raise ConfigError(
            f"train.global_batch={g} with train.grad_accum={accum} gives a global micro batch of {global_micro} "
            f"samples, which is not whole identities of data.num_instances={k} or fewer than 2 of them: the "
            f"triplet loss needs >= 2 identities per micro step; "
            + (f"use train.grad_accum in {{{_list(good)}}}" if good else
               f"use train.global_batch >= {2 * k} and a multiple of {k}"))
    return micro, accum


def _list(values) -> str:
    return ", ".join(str(v) for v in values)


def expert_hidden(moe: MoEConfig, width: int, ratio: float) -> int:
    """Expert hidden width: configured, else `ratio` x the backbone width (768 -> 512 or 1024)."""
    return moe.hidden if moe.hidden is not None else max(1, math.ceil(width * ratio))

