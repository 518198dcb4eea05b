"""The trainer's step (engine/step.py), run for real in a subprocess (it initialises torch.distributed and a
DeepSpeed engine): no host reads in a micro step, and what a non-finite loss does under train.on_nan."""
import json
import subprocess
import sys

import pytest

from launcher import ROOT

# Host reads allowed inside a micro step, with why they are not device syncs on a GPU:
HOST_TENSORS = {
    # DeepSpeed's MoE capacity: computed from the token count and torch.tensor(capacity_factor), a CPU tensor
    # (with drop_tokens; without, it is the device's max count and a real sync). Its gating compares it, and
    # our MoE layer (model/moe_dispatch.py) sizes the expert buffers with it, as DeepSpeed's forward does.
    "deepspeed/moe/sharded_moe.py:top1gating:__bool__",
    "deepspeed/moe/sharded_moe.py:forward:__int__",
    "mfrnet_ds/model/moe_dispatch.py:forward:__int__",
}
# ...and at the optimizer step (the last micro step), where DeepSpeed steps torch's Adam:
OPTIMIZER_STEP = {
    # Adam's step counter: a CPU tensor unless the optimizer is fused or capturable (on CUDA build_optimizer
    # makes it fused, and the counter then lives on the device)
    "torch/optim/optimizer.py:_get_value:item",
}


def probe(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "tests/scripts/step_probe.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def syncs():
    return probe("syncs")


def test_a_micro_step_reads_nothing_back_from_the_device(syncs):
    first, last = syncs["micro_steps"]
    assert set(first) <= HOST_TENSORS, first
    assert set(last) <= HOST_TENSORS | OPTIMIZER_STEP, last
    assert not [k for k in {**first, **last} if k.startswith("mfrnet_ds/") and k not in HOST_TENSORS]


def test_the_probe_sees_a_host_read_in_our_code(syncs):
    # the guard's check is a host read by design (the loop calls it at logging, checkpoint and evaluation
    # boundaries): the probe must see it, or it could not see one in a micro step either
    assert syncs["check"] == {"mfrnet_ds/engine/step.py:check:item": 1}


def test_uint8_images_are_normalised_on_the_device_as_the_loader_did(syncs):
    assert syncs["uint8_equal"]


def test_on_nan_stop_raises_at_the_check_naming_the_step():
    out = probe("nan-stop")
    assert out["raised"] and out["raised"].startswith("non-finite loss at step 2: loss=nan")
    assert "train.on_nan=skip" in out["raised"]


def test_on_nan_skip_leaves_the_weights_as_they_were_and_trains_on():
    out = probe("nan-skip")
    assert out["raised"] is None
    assert out["params_changed_by_bad_step"] == 0
    assert out["finite_after"]
