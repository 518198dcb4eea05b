"""The training losses (engine/loss.py) against hand computations and brute-force references on small tensors."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from mfrnet_ds.config import LossConfig
from mfrnet_ds.engine.loss import batch_hard_triplet, compute_losses


def smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> float:
    """Label-smoothed cross entropy written out: the target is (1 - eps) on the label plus eps / K on every class."""
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        total += -(1 - eps) * log_p[y] - eps / len(row) * sum(log_p)
    return total / len(labels)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def brute_force_triplet(feat: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over anchors that have a negative of the largest soft-margin loss over all of their (positive,
    negative) pairs (softplus is increasing, so that is the batch-hard triplet); the anchor is its own
    positive when it has no other."""
    rows, labels = feat.tolist(), labels.tolist()

    def d(i, j):
        return math.sqrt(sum((a - b) ** 2 for a, b in zip(rows[i], rows[j])))

    losses = []
    for a in range(len(rows)):
        pos = [p for p in range(len(rows)) if labels[p] == labels[a]]
        neg = [n for n in range(len(rows)) if labels[n] != labels[a]]
        if neg:
            losses.append(max(softplus(d(a, p) - d(a, n)) for p, n in itertools.product(pos, neg)))
    return sum(losses) / len(losses) if losses else 0.0


def test_id_loss_with_label_smoothing_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 3.0, -0.5], [-2.0, 1.0, 0.0, 0.5]])
    labels = torch.tensor([0, 2, 3])
    cfg = LossConfig(id_weight=1.0, label_smoothing=0.1, triplet_weight=0.0)
    got = compute_losses([logits], [torch.zeros(3, 2)], labels, torch.tensor(0.0), cfg)["loss_id"]
    assert got.item() == pytest.approx(smoothed_ce(logits, labels, 0.1), rel=1e-6)
    # by hand for one sample: log-softmax of [0, 0] is log 1/2 whatever the smoothing
    one = compute_losses([torch.zeros(1, 2)], [torch.zeros(1, 2)], torch.tensor([1]), torch.tensor(0.0), cfg)
    assert one["loss_id"].item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_batch_hard_triplet_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    feat = torch.randn(8, 5, generator=gen)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])   # identity 3 has no other positive
    assert batch_hard_triplet(feat, labels).item() == pytest.approx(brute_force_triplet(feat, labels), rel=1e-5)


def test_triplet_by_hand_on_a_line():
    # points on a line, per anchor: its farthest positive minus its nearest negative
    feat = torch.tensor([[0.0], [1.0], [3.0], [3.5]])
    labels = torch.tensor([0, 0, 1, 1])
    want = (softplus(1 - 3) + softplus(1 - 2) + softplus(0.5 - 2) + softplus(0.5 - 2.5)) / 4
    assert batch_hard_triplet(feat, labels).item() == pytest.approx(want, rel=1e-6)


def test_anchor_without_negative_is_masked_and_gradient_finite():
    feat = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    one_identity = batch_hard_triplet(feat, torch.tensor([5, 5, 5, 5]))
    assert one_identity.item() == 0.0, "no anchor has a negative: no triplet, not softplus(d_ap - inf)"
    one_identity.backward()
    assert torch.isfinite(feat.grad).all() and not feat.grad.any()


def test_gradient_finite_with_duplicate_features():
    # equal rows put a zero distance off the diagonal, where the gradient of a norm is undefined
    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    feat = torch.cat([base, base[:1]]).requires_grad_()
    loss = batch_hard_triplet(feat, torch.tensor([0, 1, 1, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(feat.grad).all()


def test_total_weights_the_parts_from_loss_config():
    gen = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = [torch.randn(6, 4, generator=gen) for _ in range(3)]     # per-modality head: three of each
    feats = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    aux = torch.tensor(0.125)
    cfg = LossConfig(id_weight=0.3, label_smoothing=0.2, triplet_weight=2.0)
    parts = compute_losses(logits, feats, labels, aux, cfg)
    id_sum = sum(smoothed_ce(lg, labels, 0.2) for lg in logits)
    tri_sum = sum(brute_force_triplet(f, labels) for f in feats)
    assert parts["loss_id"].item() == pytest.approx(0.3 * id_sum, rel=1e-5)
    assert parts["loss_tri"].item() == pytest.approx(2.0 * tri_sum, rel=1e-5)
    assert parts["loss_aux"].item() == 0.125, "the aux loss comes already weighted per layer"
    assert parts["loss"].item() == pytest.approx(0.3 * id_sum + 2.0 * tri_sum + 0.125, rel=1e-5)
    assert all(p.dtype == torch.float32 for p in parts.values())
