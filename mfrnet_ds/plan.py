"""Capacity plan: what one training step of a config costs per GPU on a cluster, before renting it.

    python -m mfrnet_ds.plan --config configs/rgbnt201.yaml train.global_batch=4096 --nodes 8 --gpus-per-node 8

`plan(config, nodes, gpus_per_node, ...)` returns a dict; `format_plan` prints it. The model is built on the
meta device (no weights), so a 1B-parameter plan takes about a second. What it counts:

Parameters per GPU: everything outside the experts is replicated on every rank; each MoE layer holds
num_experts / ep_size experts per rank (DeepSpeed's layout).

Memory per GPU, bytes per parameter (b = 2 under bf16/fp16, 4 in fp32), following DeepSpeed's optimizer
wrappers; M is the group a parameter's states are partitioned over: the whole world for dense parameters,
the expert-data-parallel group (world / ep_size) for a layer's experts:
    weights     b
    grads       ZeRO-0: b; ZeRO-1: b + 4/M (fp32 partition); ZeRO-2: 4/M (reduced into the fp32 partition)
    optimizer   ZeRO-0: 8 in fp32 (Adam m, v), 12 in bf16/fp16 (plus an fp32 master); ZeRO-1/2: 12/M
    buffers     ZeRO-1/2: reduce_bucket_size x b, twice with overlap_comm (DeepSpeed's gradient buckets)
    activations tensors saved for backward at the micro batch, per block (see `activation_bytes`)
Not counted: the CUDA context and allocator slack (budget 1-3 GB), transient gradients of one block during
backward, communication scratch.

Compute: a 1-sample forward counted by torch.utils.flop_counter on a copy of the model with one expert per
MoE layer; the expert part is then scaled to the padded buffers DeepSpeed really multiplies (num_experts x
capacity rows) and the router to the real expert count; a training step is 3 x forward. Time = FLOPs /
(peak x MFU).

Communication per step and GPU, at the configured link speeds (one inter-node NIC per GPU):
    all-to-all  per MoE layer and micro step: 2 forward + 2 backward, each moving the layer's dispatch buffer
                (num_experts x capacity x width x b); the part for other GPUs of the node rides NVLink, the
                rest leaves the node. DeepSpeed runs them on the critical path: fully exposed.
    gradients   ring all-reduce volume 2 (M-1)/M x bytes over each group; ZeRO-0/1 reduce once per step
                after backward (exposed); ZeRO-2 reduce-scatters every micro step (hidden behind backward
                with overlap_comm) and all-gathers the updated weights once per step (exposed).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys

from mfrnet_ds.config import Config, ConfigError, derive_batch, load_config
from mfrnet_ds.costs import (activation_bytes, capacity, forward_flops, meta_model, moe_facts, peer_fractions,
                              width_of)

GB = 1e9
# Triplets per second one loader worker decodes and augments at 256x128 (uint8 out), measured with
# bench/loader.py on the 2-core CPU here; a server core is faster: measure yours and pass --loader-rate.
LOADER_RATE = 300.0


def loader_workers(demand: float, rate: float) -> dict:
    """Loader workers per GPU that keep up with `demand` triplets/s at `rate` per worker (plus one spare: a
    worker also waits on reads)."""
    return {"demand": demand, "rate": rate, "workers": math.ceil(demand / rate) + 1}


def plan(config: Config, nodes: int, gpus_per_node: int, *, link_gbps: float = 400.0,
         intra_node_gbps: float = 3600.0, gpu_tflops: float = 989.0, gpu_mem_gb: float = 80.0,
         micro_batch: int | None = None, zero_stage: int | None = None, mfu: float = 0.4,
         ds_config: dict | None = None, loader_rate: float = LOADER_RATE) -> dict:
    """Per-GPU parameters, memory, all-to-all and gradient traffic and step time; see the module docstring.

    `ds_config`: the DeepSpeed JSON as a dict; None reads `config.train.deepspeed_config` as training does.
    Raises ConfigError for combinations training would refuse (ep_size not dividing the world, batch
    not splitting, ZeRO-3 with MoE).
    """
    cluster = {"nodes": nodes, "gpus_per_node": gpus_per_node, "world": nodes * gpus_per_node,
               "link_gbps": link_gbps, "intra_node_gbps": intra_node_gbps, "gpu_tflops": gpu_tflops,
               "gpu_mem_gb": gpu_mem_gb, "mfu": mfu}
    _check_cluster(cluster, loader_rate)
    world = cluster["world"]
    config, ds_config = _fitted(config, cluster, micro_batch, ds_config)
    micro, accum = derive_batch(config, world)
    zero = ds_config.get("zero_optimization", {})
    stage = zero.get("stage", 0) if zero_stage is None else zero_stage
    if stage not in (0, 1, 2):
        raise ConfigError(f"ZeRO stage {stage}: DeepSpeed's MoE layers work with stages 0, 1 and 2 only")
    mixed = any(ds_config.get(k, {}).get("enabled", False) for k in ("bf16", "fp16"))
    b = 2 if mixed else 4

    model = meta_model(config)
    facts = moe_facts(model)
    expert_local = {f.name: f.params_per_expert * f.num_experts // f.ep_size for f in facts}
    per_gpu = sum(p.numel() for p in model.parameters())
    dense = per_gpu - sum(expert_local.values())
    tokens_per_image = (config.model.img_size[0] // 16) * (config.model.img_size[1] // 16) + 1
    tokens = 3 * micro * tokens_per_image

    memory = _memory(facts, dense, expert_local, world, stage, zero, b, mixed)
    acts = activation_bytes(config, facts, micro, tokens_per_image, b)
    memory["activations"] = acts["total"]
    memory["total"] = sum(memory.values())
    fwd = forward_flops(config, facts, micro, tokens_per_image)
    step_flops = 3 * fwd["total"] * accum
    compute_s = step_flops / (gpu_tflops * 1e12 * mfu)
    a2a = _all_to_all(config, facts, cluster, tokens, accum, b)
    a2a_s = sum(a["time_s"] for a in a2a)
    groups = [(dense, list(range(world)))] + [
        (expert_local[f.name], list(range(0, world, f.ep_size))) for f in facts]
    backward_s = compute_s * 2 / 3 / accum          # one micro step's backward, for overlap
    grad_exposed = _grad_sync_exposed(groups, cluster, stage, bool(zero.get("overlap_comm", False)), accum,
                                      backward_s, b)
    step_s = compute_s + a2a_s + grad_exposed
    return {
        "cluster": cluster,
        "model": {"preset": config.model.preset, "img_size": tuple(config.model.img_size),
                  "tokens_per_image": tokens_per_image},
        "batch": {"global": config.train.global_batch, "micro": micro, "grad_accum": accum,
                  "tokens_per_micro": tokens},
        "zero_stage": stage, "dtype_bytes": b,
        "params": _params(facts, dense, per_gpu, world),
        "memory_bytes": memory, "activation_bytes": acts,
        "flops": {"forward_per_micro": fwd, "step_per_gpu": step_flops},
        "all_to_all": a2a,
        "time_s": {"compute": compute_s, "all_to_all": a2a_s, "grad_sync_exposed": grad_exposed, "step": step_s},
        "samples_per_s": config.train.global_batch / step_s,
        "loader": loader_workers(config.train.global_batch / step_s / world, loader_rate),
        "warnings": _warnings(memory, gpu_mem_gb, a2a_s, step_s, facts),
    }


def _params(facts, dense: int, per_gpu: int, world: int) -> dict:
    return {"total_model": dense + sum(f.params_per_expert * f.num_experts for f in facts),
            "dense": dense, "experts_per_gpu": per_gpu - dense, "per_gpu": per_gpu,
            "layers": [{"layer": f.name, "num_experts": f.num_experts, "ep_size": f.ep_size,
                        "experts_per_gpu": f.num_experts // f.ep_size, "params_per_expert": f.params_per_expert,
                        "expert_data_parallel": world // f.ep_size} for f in facts]}


def _check_cluster(cluster: dict, loader_rate: float) -> None:
    if cluster["nodes"] < 1 or cluster["gpus_per_node"] < 1:
        raise ConfigError(f"nodes={cluster['nodes']}, gpus_per_node={cluster['gpus_per_node']}: expected >= 1 each")
    for name in ("link_gbps", "intra_node_gbps", "gpu_tflops", "gpu_mem_gb"):
        if cluster[name] <= 0:
            raise ConfigError(f"{name}={cluster[name]}: expected > 0")
    if not 0 < cluster["mfu"] <= 1:
        raise ConfigError(f"mfu={cluster['mfu']}: expected a fraction in (0, 1]")
    if loader_rate <= 0:
        raise ConfigError(f"loader_rate={loader_rate}: expected > 0 (triplets/s one loader worker makes)")


def _fitted(config: Config, cluster: dict, micro_batch: int | None, ds_config: dict | None) -> tuple[Config, dict]:
    """The config with the plan's micro batch, checked for this world as training checks it, and its DeepSpeed
    JSON (read as training reads it when not given)."""
    world = cluster["world"]
    config = copy.deepcopy(config)
    if micro_batch is not None:
        config.train.micro_batch, config.train.grad_accum = micro_batch, None
    for name, moe in (("model.ffm", config.model.ffm), ("model.frm", config.model.frm)):
        if world % moe.ep_size:
            raise ConfigError(f"{name}.ep_size={moe.ep_size} does not divide nodes x gpus_per_node = "
                              f"{cluster['nodes']} x {cluster['gpus_per_node']} = {world}: "
                              f"expert-parallel groups must tile the world")
    if ds_config is None:
        from mfrnet_ds.engine.dist import deepspeed_config
        ds_config = deepspeed_config(config, world)     # the trainer's reader: same checks, same errors
    else:
        from mfrnet_ds.config import check
        check(config, world)
    return config, ds_config


def _memory(facts, dense: int, expert_local: dict, world: int, stage: int, zero: dict, b: int, mixed: bool) -> dict:
    """Weights, gradients, optimizer states and gradient buckets per GPU (bytes; module docstring)."""
    def state_bytes(n_params: float, group: int) -> dict:
        grads = {0: b, 1: b + 4 / group, 2: 4 / group}[stage] * n_params
        optim = ((12 if mixed else 8) if stage == 0 else 12 / group) * n_params
        return {"weights": b * n_params, "grads": grads, "optimizer": optim}

    parts = [state_bytes(dense, world)] + [state_bytes(expert_local[f.name], world // f.ep_size) for f in facts]
    memory = {k: sum(p[k] for p in parts) for k in ("weights", "grads", "optimizer")}
    overlap = bool(zero.get("overlap_comm", False))   # DeepSpeed turns it on by itself for stage 3 only
    buffers = 0.0
    if stage in (1, 2) and zero.get("contiguous_gradients", True):
        buffers = float(zero.get("reduce_bucket_size", 5e8)) * b * (2 if overlap else 1)
    memory["buffers"] = buffers
    return memory


def _all_to_all(config: Config, facts, cluster: dict, tokens: int, accum: int, b: int) -> list[dict]:
    """Per MoE layer: the dispatch buffer and the time of its 4 all-to-alls per micro step (fully exposed)."""
    inter_bw, intra_bw = cluster["link_gbps"] * 1e9 / 8, cluster["intra_node_gbps"] * 1e9 / 8
    out = []
    for f in facts:
        cap = capacity(f, tokens)
        buf = f.num_experts * cap * width_of(config) * b if f.ep_size > 1 else 0   # ep_size 1: no all-to-all
        intra, inter = peer_fractions(cluster["world"], cluster["gpus_per_node"],
                                      lambda r, e=f.ep_size: range(r // e * e, r // e * e + e))
        one = max(buf * intra / intra_bw, buf * inter / inter_bw)
        out.append({"layer": f.name, "ep_size": f.ep_size, "capacity": cap, "buffer_bytes": buf,
                    "bytes_per_step": 4 * accum * buf, "intra_node_fraction": intra, "off_node_fraction": inter,
                    "time_s": 4 * accum * one})
    return out


def _grad_sync_exposed(groups, cluster: dict, stage: int, overlap: bool, accum: int, backward_s: float,
                       b: int) -> float:
    """Seconds of gradient synchronisation per step that no backward hides (ring all-reduce per group)."""
    gpus_per_node = cluster["gpus_per_node"]
    inter_bw, intra_bw = cluster["link_gbps"] * 1e9 / 8, cluster["intra_node_gbps"] * 1e9 / 8

    def sync_s(n_bytes: float, group: list[int]) -> float:
        if len(group) == 1:
            return 0.0
        bw = inter_bw if len({r // gpus_per_node for r in group}) > 1 else intra_bw
        return 2 * (len(group) - 1) / len(group) * n_bytes / bw

    full = sum(sync_s(n * b, g) for n, g in groups)        # reduce + gather halves
    if stage != 2:
        return full
    per_micro = full / 2                                    # reduce-scatter, every micro step, during its backward
    exposed_micro = max(0.0, per_micro - backward_s) if overlap else per_micro
    return accum * exposed_micro + full / 2                 # + the all-gather of updated weights


def _warnings(memory: dict, gpu_mem_gb: float, a2a_s: float, step_s: float, facts) -> list[str]:
    out = []
    if memory["total"] > gpu_mem_gb * GB:
        out.append(f"needs {memory['total'] / GB:.1f} GB per GPU, more than the {gpu_mem_gb:g} GB given: "
                   f"lower the micro batch (more accumulation), raise ZeRO to 2 or ep_size")
    if a2a_s > 0.3 * step_s:
        out.append(f"all-to-all is {100 * a2a_s / step_s:.0f}% of the step: keep expert-parallel groups "
                   f"inside a node or lower the capacity factor")
    if any(not f.drop_tokens for f in facts):
        out.append("drop_tokens is off: buffers are sized for the fullest expert at run time; the plan "
                   "assumes balanced routing, a lower bound")
    return out


# ---------------------------------------------------------------------------------------------
# Printing

def _same_rows(rows: list[dict]):
    """Consecutive layers with identical numbers as one row: ("frm.1..frm.23 x12", row)."""
    groups: list[list[dict]] = []
    for row in rows:
        same = groups and {k: v for k, v in groups[-1][0].items() if k != "layer"} == \
            {k: v for k, v in row.items() if k != "layer"}
        groups[-1].append(row) if same else groups.append([row])
    for g in groups:
        yield (g[0]["layer"] if len(g) == 1 else f"{g[0]['layer']}..{g[-1]['layer']} x{len(g)}"), g[0]


def format_plan(p: dict) -> str:
    c, bt, pr, mem = p["cluster"], p["batch"], p["params"], p["memory_bytes"]
    t = p["time_s"]
    lines = [
        f"# capacity plan: preset {p['model']['preset']} {p['model']['img_size'][0]}x{p['model']['img_size'][1]}, "
        f"{c['nodes']} node{'s' if c['nodes'] > 1 else ''} x {c['gpus_per_node']} GPUs = {c['world']}, "
        f"ZeRO-{p['zero_stage']}, "
        f"{'bf16/fp16' if p['dtype_bytes'] == 2 else 'fp32'}",
        f"batch: global {bt['global']} = micro {bt['micro']} x accumulation {bt['grad_accum']} x {c['world']} GPUs; "
        f"{bt['tokens_per_micro']:,} tokens per micro step ({p['model']['tokens_per_image']} per image)",
        "",
        f"parameters: model {pr['total_model'] / 1e6:,.1f} M; per GPU {pr['per_gpu'] / 1e6:,.1f} M "
        f"= dense (replicated) {pr['dense'] / 1e6:,.1f} M + experts {pr['experts_per_gpu'] / 1e6:,.1f} M",
        f"{'MoE layer':<18}{'experts':>8}{'ep_size':>8}{'per GPU':>8}{'params/expert':>15}{'expert-DP':>10}",
    ]
    for name, layer in _same_rows(pr["layers"]):
        lines.append(f"{name:<18}{layer['num_experts']:>8}{layer['ep_size']:>8}{layer['experts_per_gpu']:>8}"
                     f"{layer['params_per_expert']:>15,}{layer['expert_data_parallel']:>10}")
    acts = p["activation_bytes"]
    lines += ["", f"memory per GPU (GB of {c['gpu_mem_gb']:g}):"]
    for k in ("weights", "grads", "optimizer", "buffers", "activations", "total"):
        lines.append(f"  {k:<12}{mem[k] / GB:>9.2f}")
    lines.append("  activations by part: " + ", ".join(f"{k} {v / GB:.2f}" for k, v in acts.items() if k != "total"))
    fl = p["flops"]
    fwd = fl["forward_per_micro"]
    lines += ["", f"compute: {fl['step_per_gpu'] / 1e12:,.1f} TFLOP per GPU per step (3 x forward; forward per micro "
                  f"step: dense {fwd['dense'] / 1e12:.2f}, experts {fwd['experts'] / 1e12:.2f}, routers "
                  f"{fwd['routers'] / 1e12:.3f} TFLOP) at {100 * c['mfu']:.0f}% of {c['gpu_tflops']:g} TFLOP/s",
              "",
              f"all-to-all per GPU and step (4 per layer and micro step; links: {c['intra_node_gbps']:g} Gb/s in "
              f"the node, {c['link_gbps']:g} Gb/s between nodes):",
              f"{'MoE layer':<18}{'ep_size':>8}{'capacity':>9}{'MB/a2a':>9}{'MB/step':>10}{'in node':>9}"
              f"{'off node':>9}{'ms/step':>9}"]
    for name, a in _same_rows(p["all_to_all"]):
        lines.append(f"{name:<18}{a['ep_size']:>8}{a['capacity']:>9}{a['buffer_bytes'] / 1e6:>9.1f}"
                     f"{a['bytes_per_step'] / 1e6:>10.1f}{100 * a['intra_node_fraction']:>8.0f}%"
                     f"{100 * a['off_node_fraction']:>8.0f}%{1e3 * a['time_s']:>9.2f}")
    lines += ["", f"step time estimate: {1e3 * t['step']:.1f} ms = compute {1e3 * t['compute']:.1f} + all-to-all "
                  f"{1e3 * t['all_to_all']:.1f} + exposed gradient sync {1e3 * t['grad_sync_exposed']:.1f}; "
                  f"{p['samples_per_s']:,.0f} samples/s"]
    ld = p["loader"]
    lines += [f"loader: each GPU takes {ld['demand']:,.0f} triplets/s; at {ld['rate']:,.0f} per worker "
              f"(bench/loader.py; --loader-rate) that is data.num_workers >= {ld['workers']} per GPU"]
    lines += [f"warning: {w}" for w in p["warnings"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="experiment YAML (default: built-in defaults)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.frm.ep_size=8")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--link-gbps", type=float, default=400.0, help="inter-node bandwidth per GPU (Gb/s)")
    ap.add_argument("--intra-node-gbps", type=float, default=3600.0,
                    help="GPU-to-GPU bandwidth inside a node, one direction (Gb/s; H100 NVLink: 450 GB/s)")
    ap.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0)
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for compute")
    ap.add_argument("--micro-batch", type=int, help="samples per GPU per forward (sets train.micro_batch)")
    ap.add_argument("--zero-stage", type=int, choices=(0, 1, 2), help="override the DeepSpeed JSON's stage")
    ap.add_argument("--loader-rate", type=float, default=LOADER_RATE,
                    help="triplets/s one loader worker makes (bench/loader.py on your nodes)")
    args = ap.parse_args(argv)
    try:
        # no weights are read: a recipe's model.pretrained=required (or a path) changes no figure of the plan
        config = load_config(args.config, [*args.overrides, "model.pretrained=none"])
        result = plan(config, args.nodes, args.gpus_per_node, link_gbps=args.link_gbps,
                      intra_node_gbps=args.intra_node_gbps, gpu_tflops=args.gpu_tflops, gpu_mem_gb=args.gpu_mem_gb,
                      micro_batch=args.micro_batch, zero_stage=args.zero_stage, mfu=args.mfu,
                      loader_rate=args.loader_rate)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
