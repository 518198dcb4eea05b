"""The expert picture (the paper's Fig. 3): pixel-exact tints, real routing of a tiny MFRNet, the CLI."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mfrnet_ds.config import load_config
from mfrnet_ds.model import build_model
from mfrnet_ds.viz import (
    TINT_ALPHA,
    TokenGrid,
    denormalise,
    expert_colours,
    expert_pictures,
    frm_layer,
    main,
    picture_layout,
    render_sample,
    route_tokens,
    take_samples,
    token_counts,
    token_grid,
)

IMG = (64, 32)
N = 6


def tiny_config(*extra):
    return load_config(None, ["model.preset=tiny", f"model.img_size=[{IMG[0]},{IMG[1]}]", "model.num_classes=8",
                              "model.frm.num_experts=4", *extra])


def expected_tint(colour) -> np.ndarray:
    return np.rint((1 - TINT_ALPHA) * 128 + TINT_ALPHA * np.asarray(colour, np.float32)).astype(np.uint8)


def panel_pixels(picture: Image.Image, box) -> np.ndarray:
    return np.asarray(picture.crop(box))


def test_expert_colours_are_fixed_distinct_and_never_grey():
    assert np.array_equal(expert_colours(4), expert_colours(6)[:4])  # expert e keeps its colour across runs
    for e in (1, 6, 18, 40):
        colours = expert_colours(e).astype(int)
        assert colours.shape == (e, 3) and len({tuple(c) for c in colours}) == e
        assert (colours.max(axis=1) - colours.min(axis=1) > 20).all()  # saturated: no tint looks untinted
    with pytest.raises(ValueError, match="num_experts"):
        expert_colours(0)


def test_picture_has_one_tint_per_expert_and_leaves_dropped_patches_plain():
    grid = TokenGrid(prefix=1, grid=(4, 2), patch=(16, 16))
    colours = expert_colours(6)
    images = np.full((3, 64, 32, 3), 128, np.uint8)  # a flat grey sample: every patch shows only its tint
    routes = np.array([[5, 0, 0, 2, 2, 5, 5, -1, 0],
                       [3, 2, 2, 2, 2, 2, 2, 2, 2],
                       [0, -1, -1, 0, 5, 5, 0, -1, 0]])
    picture, layout = render_sample(images, routes, grid, colours, header="test", scale=3)
    assert picture.size == layout.size == picture_layout((64, 32), 3, 6).size
    assert picture.size[0] >= 3 * 32 * 3 and picture.size[1] >= 64 * 3
    for m, box in enumerate(layout.panels):
        assert (box[2] - box[0], box[3] - box[1]) == (32 * 3, 64 * 3)
        pixels = panel_pixels(picture, box)
        patches = routes[m, 1:].reshape(4, 2)
        for (i, j), expert in np.ndenumerate(patches):
            block = pixels[i * 48:(i + 1) * 48, j * 48:(j + 1) * 48].reshape(-1, 3)
            want = np.full(3, 128, np.uint8) if expert < 0 else expected_tint(colours[expert])
            assert (block == want).all(), (m, i, j, expert)
        distinct = {tuple(p) for p in pixels.reshape(-1, 3)}
        used = set(patches.ravel().tolist())
        assert len(distinct) == len(used)  # one tint per expert that got a patch (+ plain grey for dropped)
    # expert 3 got only the NIR CLS token, which has no patch: its tint appears nowhere
    assert tuple(expected_tint(colours[3])) not in {tuple(p) for p in panel_pixels(picture, layout.panels[1])
                                                   .reshape(-1, 3)}
    with pytest.raises(ValueError, match="routes"):
        render_sample(images, routes[:, :5], grid, colours)


@pytest.fixture(scope="module")
def samples(person_shards):
    return take_samples(person_shards, "query", N, IMG)


def test_routes_are_per_sample_and_match_the_layer_counts(samples):
    model = build_model(tiny_config()).eval()
    layer = frm_layer(model)
    grid = token_grid(model)
    routes = route_tokens(model, samples["images"], samples["camids"], layer)
    assert routes.shape == (N, 3, grid.tokens) == (N, 3, 1 + 4 * 2)
    assert routes.min() >= 0 and len(routes.unique()) > 1  # evaluation drops nothing; experts differ
    # the hook saw the same top-1 choices the layer counted
    assert torch.equal(torch.bincount(routes.flatten(), minlength=4), layer.expert_counts.cpu().long())
    # (3B, T) modality-major tokens were regrouped per sample: each sample alone routes the same way
    for k in (0, N - 1):
        alone = route_tokens(model, samples["images"][k:k + 1], samples["camids"][k:k + 1], layer)
        assert torch.equal(alone[0], routes[k])
    counts = token_counts(routes, 4)
    assert counts.shape == (3, 5) and (counts.sum(axis=1) == N * grid.tokens).all() and (counts[:, 4] == 0).all()
    with pytest.raises(ValueError, match="frm.3"):
        frm_layer(model, "frm.7")


def test_expert_pictures_tint_real_routes_and_write_the_chart(samples, person_shards, tmp_path):
    # a small evaluation capacity with dropping on: some tokens are dropped and must stay untinted
    model = build_model(tiny_config("model.frm.eval_drop_tokens=true", "model.frm.eval_capacity_factor=0.5"))
    result = expert_pictures(model, person_shards, tmp_path, n=N, progress=False)
    routes = result.routes
    assert (routes < 0).any() and (routes >= 0).any()
    assert len(result.pictures) == N and result.chart.is_file() and result.summary.is_file()
    with Image.open(result.chart) as chart:
        assert chart.format == "PNG" and chart.size[0] > 300
    colours = expert_colours(4)
    summary = json.loads(result.summary.read_text())
    positions = [s["position"] for s in summary["samples"]]        # the pictured samples' places in the split
    everything = take_samples(person_shards, "query", 10_000, IMG)
    originals = denormalise(everything["images"][positions]).astype(np.float32)
    scale = 4                                                       # default: panels >= 256 px tall
    layout = picture_layout(IMG, scale, 4)
    for k, path in enumerate(result.pictures):
        picture = Image.open(path).convert("RGB")
        assert picture.size == layout.size
        for m, box in enumerate(layout.panels):
            pixels = panel_pixels(picture, box)[::scale, ::scale].astype(np.float32)  # native resolution
            patches = routes[k, m, 1:].reshape(4, 2).numpy()
            for (i, j), expert in np.ndenumerate(patches):
                got = pixels[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16]
                orig = originals[k, m, i * 16:(i + 1) * 16, j * 16:(j + 1) * 16]
                if expert < 0:
                    assert np.array_equal(got, orig), (k, m, i, j)
                else:  # the colour blended in is exactly that expert's, up to rounding
                    colour = (got - (1 - TINT_ALPHA) * orig) / TINT_ALPHA
                    assert np.abs(colour - colours[expert]).max() <= 1.01 / TINT_ALPHA, (k, m, i, j, expert)
    assert summary["layer"] == "frm.3" and len(summary["samples"]) == N
    # spread over identities and cameras: as many distinct ids (and cameras) as the split offers, up to N
    pids, cams = everything["pids"].tolist(), everything["camids"].tolist()
    assert len({s["pid"] for s in summary["samples"]}) == min(N, len(set(pids)))
    assert len({s["camid"] for s in summary["samples"]}) == min(N, len(set(cams)))
    assert [(s["pid"], s["camid"]) for s in summary["samples"]] == [(pids[p], cams[p]) for p in positions]
    # the chart, the JSON and the shares (the logged metric) count every routed sample of the split, once
    assert summary["num_samples"] == len(pids) and "evaluation mode" in summary["caption"]
    for m, name in enumerate(("rgb", "nir", "tir")):
        want = result.counts[m]
        assert [summary["tokens"][name][str(e)] for e in range(4)] + [summary["tokens"][name]["dropped"]] == \
            want.tolist()
        assert want.sum() == len(pids) * 9
    routed = result.counts[:, :4].sum(axis=0)
    assert summary["shares"] == pytest.approx((routed / routed.sum()).tolist()) == result.shares


def test_cli_from_an_exported_file(person_shards, tmp_path, capsys):
    config = tiny_config()
    model = build_model(config)
    exported = tmp_path / "model.pt"
    torch.save({"config": config.to_dict(), "state_dict": model.state_dict()}, exported)  # export's format
    out = tmp_path / "pictures"
    out.mkdir()
    (out / "experts_09_pid0001_cam0.png").write_bytes(b"stale")  # from an earlier, larger --n
    assert main(["experts", "--checkpoint", str(exported), "--shards", str(person_shards), "--out", str(out),
                 "--n", "2", "--scale", "2"]) == 0
    names = sorted(p.name for p in out.iterdir())
    pictures = [n for n in names if n.startswith("experts_")]
    assert len(pictures) == 2 and "expert_shares.png" in names and "expert_shares.json" in names
    with Image.open(out / pictures[0]) as picture:
        assert picture.size == picture_layout(IMG, 2, 4).size
    assert main(["experts", "--checkpoint", str(exported), "--shards", str(person_shards), "--out", str(out),
                 "--layer", "frm.0"]) == 2
    assert "frm.3" in capsys.readouterr().err
    assert main(["experts", "--checkpoint", str(tmp_path / "nope"), "--shards", str(person_shards),
                 "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
