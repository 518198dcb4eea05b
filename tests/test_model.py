import pytest
import torch

from mfrnet_ds import build_model, load_config
from mfrnet_ds.engine.loss import compute_losses
from mfrnet_ds.model import MISSING_SETTINGS


def tiny(*overrides, size=(64, 32)):
    return load_config(None, [f"model.img_size=[{size[0]},{size[1]}]", "model.num_classes=5", *overrides])


def batch(b, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 3, *size, generator=g), torch.randint(0, 4, (b,), generator=g)


@pytest.mark.parametrize("size, head", [((256, 128), "concat"), ((128, 256), "per_modality")])
def test_forward_backward_both_orientations(size, head):
    cfg = tiny(f"model.head={head}", size=size)
    model = build_model(cfg).train()
    images, camids = batch(4, size)
    out = model(images, camids)
    P = 32
    assert out.embedding.shape == (4, 3 * P)
    assert torch.allclose(out.embedding.norm(dim=1), torch.ones(4))
    logits = model.classify(out.features)
    assert len(out.features) == (1 if head == "concat" else 3) == len(logits)
    assert all(l.shape == (4, 5) for l in logits)
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0
    parts = compute_losses(logits, out.features, torch.tensor([0, 0, 1, 1]), out.aux_loss, cfg.loss)
    parts["loss"].backward()
    experts = [p for n, p in model.named_parameters() if ".deepspeed_experts." in n]
    assert experts and all(p.grad is not None for p in experts[:4])
    assert model.vit.patch_embed.proj.weight.grad.abs().sum() > 0


def test_aux_counted_once_per_layer_per_forward():
    model = build_model(tiny()).train()
    images, camids = batch(2, (64, 32))
    out = model(images, camids)
    names = sorted(model.moe_stats())
    assert names == ["ffm.A", "ffm.B", "frm.3"]
    expected = sum(m.aux_loss for m in model.moe_layers)
    assert torch.allclose(out.aux_loss, expected)
    assert out.aux_loss > 0
    # the configured weight multiplies each layer's loss (eval: no gate noise, deterministic routing)
    w1, w2 = (build_model(tiny(f"model.frm.aux_weight={w}", f"model.ffm.aux_weight={w}")).eval() for w in (0.01, 0.03))
    with torch.no_grad():
        assert torch.allclose(w2(images, camids).aux_loss, 3 * w1(images, camids).aux_loss)


def test_batch_of_one_goes_through_both_moe_paths():
    model = build_model(tiny()).eval()
    images, camids = batch(1, (64, 32))
    with torch.no_grad():
        out = model(images, camids)
    tokens = 3 * (1 + 4 * 2)  # three modalities x (CLS + 4x2 patches)
    for name, s in model.moe_stats().items():
        assert s["counts"].sum().item() == tokens, name
    assert torch.isfinite(out.embedding).all()


def test_experts_distinct_weights_and_tokens():
    model = build_model(tiny("model.frm.num_experts=4")).eval()
    # the experts run batched (GroupedMOELayer), not one module call each: read what each expert receives
    # from its layer's router, (tokens, D) in and the (k, tokens) expert index out (-1: over capacity)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [layer.router.register_forward_hook(
        lambda mod, inp, out, name=layer.name: seen.__setitem__(name, (inp[0].detach(), out[3])))
        for layer in model.moe_layers]
    images, camids = batch(4, (64, 32))
    with torch.no_grad():
        model(images, camids)
    for layer in model.moe_layers:
        weights = [e.fc1.weight for e in layer.local_experts]
        for a in range(len(weights)):
            for b in range(a + 1, len(weights)):
                assert not torch.allclose(weights[a], weights[b]), (layer.name, a, b)
        tokens, indices = seen[layer.name]
        received = [tokens[(indices == i).any(0)] for i in range(len(weights))]
        busy = [r for r in received if len(r)]
        assert len(busy) >= 2, layer.name
        for a in range(len(busy)):
            for b in range(a + 1, len(busy)):
                assert busy[a].shape != busy[b].shape or not torch.equal(busy[a], busy[b])
    for h in hooks:
        h.remove()


def test_missing_modalities_rebuild_from_present():
    model = build_model(tiny()).eval()
    images, camids = batch(3, (64, 32))
    with torch.no_grad():
        full = model(images, camids).embedding
        for missing in MISSING_SETTINGS:
            emb = model(images, camids, missing=missing).embedding
            assert torch.isfinite(emb).all(), missing
            assert not torch.allclose(emb, full, atol=1e-4), missing
            # the absent image's content must not matter
            noisy = images.clone()
            for c in missing:
                noisy[:, "rnt".index(c)] = torch.randn_like(noisy[:, 0])
            assert torch.allclose(model(noisy, camids, missing=missing).embedding, emb, atol=1e-6), missing
    with pytest.raises(ValueError, match="missing='rnt'"):
        model(images, camids, missing="rnt")


def test_same_config_same_weights_and_routers():
    a = build_model(tiny()).state_dict()
    b = build_model(tiny()).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = build_model(tiny("train.seed=1")).state_dict()
    assert not torch.equal(a["vit.blocks.3.mlp.moe.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight"],
                           c["vit.blocks.3.mlp.moe.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight"])


def test_router_dim_sets_the_cosine_projection():
    default, narrow = build_model(tiny()), build_model(tiny("model.frm.router_dim=16"))
    assert default.moe_layers[-1].router.proj.out_features == 256
    frm = [m for m in narrow.moe_layers if m.name.startswith("frm.")]
    assert frm and all(m.router.proj.out_features == 16 and m.router.centroids.shape[1] == 16 for m in frm)
    assert all(m.router.proj.out_features == 256 for m in narrow.moe_layers if m.name.startswith("ffm."))


def test_place_experts_gives_each_rank_the_single_process_experts():
    """The model knows no ranks; dist.place_experts gives rank r of an ep_size=2 layer the experts one process
    holds at the same global indices, bit for bit, and touches nothing else."""
    from mfrnet_ds.engine import ckpt, dist as D
    full = build_model(tiny()).state_dict()                     # ep_size 1: all six FRM experts
    cfg = tiny("model.frm.ep_size=2")
    for rank in (0, 1, 3):
        model = D.place_experts(build_model(cfg), cfg.train.seed, rank)
        want = ckpt.shard_state_dict(full, model, rank)
        got = model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), rank
    first, second = (D.place_experts(build_model(cfg), cfg.train.seed, r).state_dict() for r in (0, 1))
    key = "vit.blocks.3.mlp.moe.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight"
    assert not torch.equal(first[key], second[key])


@pytest.mark.parametrize("router, k", [("linear", 1), ("cosine", 2), ("linear", 3)])
def test_router_kinds_and_top_k(router, k):
    model = build_model(tiny(f"model.frm.router={router}", f"model.frm.top_k={k}",
                             "model.frm.drop_tokens=false")).train()
    images, camids = batch(2, (64, 32))
    out = model(images, camids)
    s = model.moe_stats()["frm.3"]
    assert s["counts"].sum().item() == k * 2 * 3 * 9   # every route of 2 samples x 3 modalities x 9 tokens
    assert s["dropped"].item() == 0.0       # no capacity limit when tokens are not dropped
    out.aux_loss.backward()


def test_capacity_drops_tokens_and_is_reported():
    model = build_model(tiny("model.frm.capacity_factor=0.25", "model.frm.min_capacity=1")).train()
    images, camids = batch(4, (64, 32))
    model(images, camids)
    assert model.moe_stats()["frm.3"]["dropped"].item() >= 0.7


def test_summary_table_for_base(capsys):
    from mfrnet_ds.summary import main
    assert main(["model.preset=base", "model.num_classes=171"]) == 0
    out = capsys.readouterr().out
    rows = {line[:40].strip(): line[40:].split() for line in out.splitlines()[2:-1]}
    total, active = (int(x.replace(",", "")) for x in rows["total"])
    assert 90e6 < total < 100e6 and active < total
    frm_total, frm_active = (int(x.replace(",", "")) for x in rows["FRM (representation experts)"])
    expert = 768 * 512 + 512 + 512 * 768 + 768
    assert frm_total - frm_active == 5 * expert          # top-1 of 6: five experts idle per token
    assert "GFLOPs per triplet" in out
    flops_line = next(line for line in out.splitlines() if line.startswith("GFLOPs per triplet"))
    torch_count, fvcore = (float(w.rstrip("):")) for w in flops_line.split() if w[0].isdigit() and "." in w)
    assert fvcore == pytest.approx(torch_count / 2, abs=0.01)


def test_eval_embedding_does_not_depend_on_batch_mates():
    model = build_model(tiny("model.frm.capacity_factor=0.5", "model.frm.eval_capacity_factor=0.5")).eval()
    images, camids = batch(6, (64, 32))
    with torch.no_grad():
        together = model(images, camids).embedding
        alone = torch.cat([model(images[i:i + 1], camids[i:i + 1]).embedding for i in range(6)])
    assert torch.allclose(together, alone, atol=1e-5)
