"""Resume on another world size: a checkpoint written by 2 ranks (FRM experts split, ep_size 2) continues on
1 rank (ep_size 1), and one written by 1 rank continues on 2 ranks.

The check: resume with the learning rate set to 0 for one step, so the parameters must come out of the
new run's checkpoint exactly as they went in. Expert files are named by global expert index, so a rank
that loaded the wrong experts would write them back under the wrong names and the comparison would catch
it. Only BatchNorm running statistics move in that step (they follow the batches, not the lr).
Slow (launcher start-up), run in CI."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from launcher import ROOT, read_train_log, remove_shm_buffers, run_deepspeed, tiny_shards, tiny_train_args
from mfrnet_ds.engine.ckpt import merged_state_dict

TRAIN = ROOT / "launch/train.py"
WARNING = "optimizer state (Adam moments) reset"
FROZEN = ["optim.lr=0", "optim.backbone_lr=0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory)


def train(world: int, args: list[str]) -> str:
    """Run launch/train.py on `world` CPU ranks; returns its output (stdout + stderr)."""
    if world > 1:
        proc = run_deepspeed(TRAIN, args, nprocs=world, timeout=300)
        remove_shm_buffers("127.0.0.1", int(proc.args[proc.args.index("--master_port") + 1]))
    else:
        proc = subprocess.run([sys.executable, str(TRAIN), *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.returncode == 0, f"launch/train.py exited {proc.returncode}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def parameters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def check_resharded(out, shards, world_from: int, ep_from: int, world_to: int, ep_to: int):
    train(world_from, tiny_train_args(shards, out, f"model.frm.ep_size={ep_from}", "train.max_steps=2"))
    ckpts = out / "checkpoints"
    saved, saved_client = merged_state_dict(ckpts / "step00000002")
    assert saved_client["layout"]["world_size"] == world_from

    text = train(world_to, tiny_train_args(shards, out, f"model.frm.ep_size={ep_to}", "train.max_steps=3",
                                           *FROZEN) + ["--resume"])
    assert WARNING in text, text[-4000:]
    assert f"'world_size': {world_from}" in text and f"this run has {{'world_size': {world_to}" in text
    assert [r["step"] for r in read_train_log(out)] == [1, 2, 3]     # the step count carried over
    assert (ckpts / "latest").read_text().strip() == "step00000003"
    loaded, client = merged_state_dict(ckpts / "step00000003")
    assert client["layout"]["world_size"] == world_to and client["layout"]["ep_sizes"][-1] == ep_to
    frm_files = sorted(p.name for p in (ckpts / "step00000003").glob("layer_0_expert_*_mp_rank_00_model_states.pt"))
    assert len(frm_files) == 4, frm_files
    want, got = parameters(saved), parameters(loaded)
    assert want.keys() == got.keys()
    experts = [k for k in want if ".deepspeed_experts." in k]
    assert len(experts) >= 4 * 4, experts          # 4 FRM experts x (fc1, fc2) x (weight, bias), and the FFM's
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, f"parameters changed by the {world_from}->{world_to} rank resume: {differ[:10]}"
    # and the experts really differ from each other, so a swap would have shown
    frm = [next(v for k, v in torch.load(ckpts / "step00000002" / f"layer_0_expert_{e}_mp_rank_00_model_states.pt",
                                         weights_only=True).items() if k.endswith("fc1.weight")) for e in range(4)]
    assert all(not torch.equal(frm[0], w) for w in frm[1:])


@pytest.mark.slow
def test_two_ranks_ep2_resume_on_one_rank_ep1(shards, tmp_path):
    check_resharded(tmp_path / "run", shards, world_from=2, ep_from=2, world_to=1, ep_to=1)


@pytest.mark.slow
def test_one_rank_ep1_resumes_on_two_ranks_ep2(shards, tmp_path):
    check_resharded(tmp_path / "run", shards, world_from=1, ep_from=1, world_to=2, ep_to=2)
