"""The training pipeline at a small scale under the real `deepspeed` launcher: 2 CPU processes, FRM ep_size=2,
real WebDataset shards, a real MLflow store. Slow (launcher start-up), run in CI."""
import json
import subprocess
import sys
import time

import pytest
import torch

from launcher import ROOT, run_deepspeed
from mfrnet_ds.shards import build
from mfrnet_ds.synth import make_tree

TRAIN = ROOT / "launch/train.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw201")
    make_tree("rgbnt201", root, ids=24, cams=3, per_cam=3, seed=5)       # 12 train ids, 12 test ids
    out = tmp_path_factory.mktemp("shards201")
    build("rgbnt201", root, out, maxcount=32)
    return out


def overrides(shards, out_dir, *extra):
    return ["--config", str(ROOT / "configs/demo.yaml"), f"data.shards={shards}", f"train.out_dir={out_dir}",
            "model.img_size=[128,64]", "train.global_batch=16", "data.num_instances=4", "data.num_workers=1",
            f"tracking.uri=sqlite:///{out_dir}/mlflow.db", *extra]


def train_log(out_dir):
    return [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_loss_falls_and_map_rises(shards, tmp_path):
    out = tmp_path / "run"
    run_deepspeed(TRAIN, overrides(shards, out, "train.epochs=20", "train.eval_every=20", "train.log_every=5"),
                  nprocs=2, timeout=600)
    log = train_log(out)
    first, last = log[0]["loss"], sum(r["loss"] for r in log[-3:]) / 3
    assert last < first, (first, last)
    before = json.loads((out / "metrics_untrained.json").read_text())
    after = json.loads((out / "metrics.json").read_text())
    assert after["mAP"] > before["mAP"] + 1.0, (before, after)
    # every evaluation carries the pixel-matching baseline and the embedding's health, also in the log
    evals = [json.loads(line) for line in (out / "eval_log.jsonl").read_text().splitlines()]
    for record in (after, *evals):
        assert {"pixel_mAP", "pixel_R1", "mean_cosine", "effective_rank", "same_camera_nn"} <= set(record)
        assert 1.0 <= record["effective_rank"] <= record["embedding_dim"] and -1 <= record["mean_cosine"] <= 1
    assert len({r["pixel_mAP"] for r in evals}) == 1          # computed once, the same at every evaluation
    # checkpoint: both ranks wrote their experts (4 FRM experts, 2 per rank), latest and best are complete
    ckpts = out / "checkpoints"
    tag = (ckpts / "latest").read_text().strip()
    assert (ckpts / tag / "COMPLETE").is_file() and (ckpts / (ckpts / "best").read_text().strip()).is_dir()
    frm_files = sorted(p.name for p in (ckpts / tag).glob("layer_0_expert_*_model_states.pt"))
    assert len(frm_files) == 4, frm_files
    assert all((ckpts / tag / f"rng_rank{r}.pt").is_file() for r in range(2))
    # expert load and dropped fractions are logged per layer
    assert any(k.startswith("expert_load/frm.3/") for k in log[-1]) and "dropped/frm.3" in log[-1]


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(shards, tmp_path):
    common = ["train.epochs=2", "train.log_every=1", "train.eval_every=100", "train.eval_first=false",
              "train.eval_missing=false", "tracking.enabled=false"]
    straight = tmp_path / "straight"
    run_deepspeed(TRAIN, overrides(shards, straight, *common, "train.max_steps=6"), nprocs=2)
    cut = tmp_path / "cut"
    run_deepspeed(TRAIN, overrides(shards, cut, *common, "train.max_steps=4"), nprocs=2)
    assert (cut / "checkpoints/latest").read_text().strip() == "step00000004"
    run_deepspeed(TRAIN, overrides(shards, cut, *common, "train.max_steps=6") + ["--resume"], nprocs=2)
    want = {r["step"]: r["loss"] for r in train_log(straight)}
    got = {r["step"]: r["loss"] for r in train_log(cut)}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), (step, got[step], want[step])


@pytest.mark.slow
def test_export_matches_engine_and_evaluate_cli(shards, tmp_path):
    out = tmp_path / "run"
    run_deepspeed(TRAIN, overrides(shards, out, "train.epochs=1", "train.eval_first=false", "train.eval_missing=false",
                                   "tracking.enabled=false"), nprocs=2)
    emb_file = tmp_path / "engine_query.pt"
    proc = run_deepspeed(ROOT / "launch/evaluate.py",
                         ["--checkpoint", str(out), "--shards", str(shards), "--missing", "all", "--batch", "16",
                          "--json", str(tmp_path / "eval.json"), "--save-embeddings", str(emb_file)], nprocs=2)
    assert "M(NIR+TIR)" in proc.stdout and "missing avg" in proc.stdout
    table = json.loads((tmp_path / "eval.json").read_text())
    assert set(table) == {"", "r", "n", "t", "rn", "rt", "nt"}
    proc = run_deepspeed(ROOT / "launch/evaluate.py",
                         ["--checkpoint", str(out), "--shards", str(shards), "--batch", "16", "--re-ranking",
                          "--json", str(tmp_path / "eval_rr.json"), "--save-embeddings", str(emb_file)], nprocs=2)
    reranked = json.loads((tmp_path / "eval_rr.json").read_text())[""]
    assert "re-ranking" in proc.stdout
    # the launcher's numbers are those of the re-ranked distances of its own embeddings (RGBNT201: query = gallery)
    from mfrnet_ds.eval.embed import score
    q = torch.load(emb_file, weights_only=True)
    expected = score(q, q, "camids", re_ranking=True)
    assert {k: reranked[k] for k in expected} == pytest.approx(expected, abs=1e-6)

    # the same ep_size 2 checkpoint in ONE process: experts re-sharded as --resume does, same embeddings and mAP
    single_emb = tmp_path / "single_query.pt"
    t0 = time.perf_counter()
    single = subprocess.run([sys.executable, str(ROOT / "launch/evaluate.py"), "--checkpoint", str(out), "--shards",
                             str(shards), "--batch", "16", "--json", str(tmp_path / "eval_1.json"),
                             "--save-embeddings", str(single_emb)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-4000:]
    assert "experts re-sharded (model.frm.ep_size 2 -> 1)" in single.stderr, single.stderr[-2000:]
    one, two = torch.load(single_emb, weights_only=True), torch.load(emb_file, weights_only=True)
    assert torch.equal(one["pids"], two["pids"]) and one["embedding"].shape == two["embedding"].shape
    assert torch.allclose(one["embedding"], two["embedding"], atol=1e-5, rtol=0), \
        (one["embedding"] - two["embedding"]).abs().max()
    one_map = json.loads((tmp_path / "eval_1.json").read_text())[""]["mAP"]
    assert abs(one_map - table[""]["mAP"]) < 1e-4, (one_map, table[""]["mAP"])
    print(f"ep_size 2 checkpoint evaluated in one process: {time.perf_counter() - t0:.1f}s, max |diff| "
          f"{(one['embedding'] - two['embedding']).abs().max().item():.2e}, mAP {one_map:.4f}")

    from mfrnet_ds.export import load_exported
    from mfrnet_ds.stream.pipeline import eval_loader
    path = tmp_path / "model.pt"      # the command line, in one process, of the 2-rank ep_size 2 checkpoint
    cli = subprocess.run([sys.executable, "-m", "mfrnet_ds.export", str(out), str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and f"wrote {path}" in cli.stdout, cli.stderr[-2000:]
    config, model = load_exported(path)
    assert config.model.frm.ep_size == 1 and len(model.vit.blocks[3].mlp.local_experts) == 4
    engine_q = torch.load(emb_file, weights_only=True)
    embs, index = [], []
    with torch.no_grad():
        for b in eval_loader(shards, "query", batch_size=16, img_size=config.model.img_size):
            keep = b["valid"]
            embs.append(model(b["images"], b["camids"]).embedding[keep])
            index.append(b["index"][keep])
    plain = torch.cat(embs)[torch.argsort(torch.cat(index))]
    assert plain.shape == engine_q["embedding"].shape
    assert torch.allclose(plain, engine_q["embedding"], atol=1e-5)
