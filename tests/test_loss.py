"""Tests of aligned_reid.loss against brute-force references: per-anchor hard mining by loops, the
triplet, ID and mutual-learning terms and their statistics (local distances of the mined pairs by
conftest's brute_local_dist), weights, normalisation, gradchecks. The distances are in test_distance.py."""
import math

import pytest
import torch

from aligned_reid.loss import (compute_losses, euclidean_dist, hard_example_mining, mutual_losses,
                               triplet_loss)
from conftest import brute_local_dist


# Tiny tensors: on a shared machine thread wake-ups would cost more than the work.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def loop_mining(dist, labels):
    """Per-anchor reference: farthest other same-label item, nearest other-label item."""
    ap, an, pi, ni = [], [], [], []
    for i in range(len(labels)):
        pos = [j for j in range(len(labels)) if labels[j] == labels[i] and j != i]
        neg = [j for j in range(len(labels)) if labels[j] != labels[i]]
        p = max(pos, key=lambda j: dist[i, j].item())
        q = min(neg, key=lambda j: dist[i, j].item())
        ap.append(dist[i, p].item())
        an.append(dist[i, q].item())
        pi.append(p)
        ni.append(q)
    return ap, an, pi, ni


@pytest.mark.parametrize("labels", [
    [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2],      # P x K
    [3, 1, 3, 3, 7, 1, 7, 7, 7, 3, 1, 5, 5],  # unequal counts, shuffled
    [0, 1, 0, 1],
])
def test_hard_example_mining_matches_loop(labels):
    gen = torch.Generator().manual_seed(5)
    labels = torch.tensor(labels)
    feats = torch.randn(len(labels), 6, generator=gen, dtype=torch.float64)
    dist = euclidean_dist(feats, feats)
    dist_ap, dist_an, p_inds, n_inds = hard_example_mining(dist, labels)
    ap, an, pi, ni = loop_mining(dist, labels)
    assert torch.allclose(dist_ap, torch.tensor(ap, dtype=torch.float64))
    assert torch.allclose(dist_an, torch.tensor(an, dtype=torch.float64))
    assert p_inds.tolist() == pi and n_inds.tolist() == ni


def test_hard_example_mining_errors():
    with pytest.raises(ValueError, match="no positive"):
        hard_example_mining(torch.rand(3, 3), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="no negative"):
        hard_example_mining(torch.rand(3, 3), torch.tensor([4, 4, 4]))


def test_triplet_loss_values():
    ap, an = torch.tensor([1., 2.]), torch.tensor([2., 1.])
    assert torch.isclose(triplet_loss(ap, an, 0.3), torch.tensor((0. + 1.3) / 2))
    soft = (math.log1p(math.exp(-1.)) + math.log1p(math.exp(1.))) / 2
    assert torch.isclose(triplet_loss(ap, an, None), torch.tensor(soft))


def make_outputs(labels, spread, gen, num_classes=None, stripes=4, dim=16, local_dim=8):
    """Features clustered per identity: centres `spread` apart, small noise."""
    n = len(labels)
    k = int(labels.max()) + 1
    centres = torch.randn(k, dim, generator=gen, dtype=torch.float64) * spread
    g = centres[labels] + 0.01 * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    lc = torch.randn(k, stripes, local_dim, generator=gen, dtype=torch.float64) * spread
    lf = lc[labels] + 0.01 * torch.randn(n, stripes, local_dim, generator=gen,
                                         dtype=torch.float64)
    out = {"global": g, "local": lf}
    if num_classes:
        logits = torch.full((n, num_classes), -spread, dtype=torch.float64)
        logits[torch.arange(n), labels] = spread
        out["logits"] = logits
    return out


def test_losses_zero_when_separated_positive_otherwise():
    gen = torch.Generator().manual_seed(6)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    kwargs = dict(global_loss_weight=1., local_loss_weight=1., id_loss_weight=1.)
    far = compute_losses(make_outputs(labels, 100., gen, num_classes=3), labels, **kwargs)
    assert far["global_loss"].item() == 0. and far["local_loss"].item() == 0.
    assert far["id_loss"].item() < 1e-12 and far["loss"].item() < 1e-12
    assert far["global_prec"] == far["global_sm"] == 1. and far["local_sm"] == 1.
    assert far["id_prec"] == 1.
    # Identical features for everyone: d_ap = d_an, so each triplet costs the margin.
    same = {"global": torch.ones(9, 16), "local": torch.ones(9, 4, 8),
            "logits": torch.zeros(9, 3)}
    close = compute_losses(same, labels, **kwargs)
    assert close["global_loss"].item() == pytest.approx(0.3, abs=1e-4)
    assert close["local_loss"].item() == pytest.approx(0.3, abs=1e-3)
    assert close["id_loss"].item() == pytest.approx(math.log(3))
    assert close["loss"].item() == pytest.approx(0.6 + math.log(3), abs=2e-3)
    assert close["global_sm"] == 0.


def test_compute_losses_terms_weights_and_statistics():
    gen = torch.Generator().manual_seed(7)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    out = make_outputs(labels, 0.3, gen, num_classes=3)
    only_global = compute_losses(out, labels)
    assert set(only_global) == {"loss", "global_loss", "global_prec", "global_sm",
                                "global_dist_ap", "global_dist_an"}
    stats = [only_global[k] for k in only_global if "_loss" not in k and k != "loss"]
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in stats)
    res = compute_losses(out, labels, global_margin=0.5, local_margin=0.2,
                         global_loss_weight=0.5, local_loss_weight=2., id_loss_weight=3.,
                         label_smoothing=0.1)
    total = 0.5 * res["global_loss"] + 2. * res["local_loss"] + 3. * res["id_loss"]
    assert torch.isclose(res["loss"], total)
    # Statistics by hand from the mined global pairs.
    dist = euclidean_dist(out["global"], out["global"])
    ap, an, pi, ni = loop_mining(dist, labels)
    ap, an = torch.tensor(ap), torch.tensor(an)
    assert float(res["global_prec"]) == pytest.approx((an > ap).double().mean().item())
    assert float(res["global_sm"]) == pytest.approx((an > ap + 0.5).double().mean().item())
    assert float(res["global_dist_ap"]) == pytest.approx(ap.mean().item())
    # Local loss on the globally mined pairs, by brute force.
    lf = out["local"]
    l_ap = torch.tensor([brute_local_dist(lf[i], lf[pi[i]]) for i in range(7)])
    l_an = torch.tensor([brute_local_dist(lf[i], lf[ni[i]]) for i in range(7)])
    assert res["local_loss"].item() == pytest.approx(
        torch.relu(l_ap - l_an + 0.2).mean().item(), abs=1e-9)
    assert float(res["local_dist_ap"]) == pytest.approx(l_ap.mean().item())
    # Own mining uses the full local distance matrix.
    own = compute_losses(out, labels, local_loss_weight=1., local_dist_own_hard_sample=True)
    full = torch.tensor([[brute_local_dist(a, b) for b in lf] for a in lf])
    o_ap, o_an, _, _ = loop_mining(full, labels)
    assert float(own["local_dist_an"]) == pytest.approx(sum(o_an) / 7)
    assert float(own["local_dist_ap"]) == pytest.approx(sum(o_ap) / 7)
    with pytest.raises(ValueError, match="num_classes"):
        compute_losses({"global": out["global"], "local": lf}, labels, id_loss_weight=1.)


def test_compute_losses_normalize_feature():
    gen = torch.Generator().manual_seed(8)
    labels = torch.tensor([0, 0, 1, 1])
    out = make_outputs(labels, 1., gen)
    scaled = {"global": out["global"] * 7., "local": out["local"] * 3.}
    a = compute_losses(out, labels, local_loss_weight=1., normalize_feature=True)
    b = compute_losses(scaled, labels, local_loss_weight=1., normalize_feature=True)
    assert torch.isclose(a["loss"], b["loss"])
    assert a["global_dist_an"] <= 2. + 1e-9       # unit vectors are at most 2 apart


def test_losses_gradcheck():
    gen = torch.Generator().manual_seed(9)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    base = make_outputs(labels, 0.5, gen, num_classes=3, stripes=3, dim=5, local_dim=4)

    def total(g, lf, logits):
        out = {"global": g, "local": lf, "logits": logits}
        return compute_losses(out, labels, global_margin=None, local_margin=None,
                              local_loss_weight=1., id_loss_weight=1., normalize_feature=True,
                              label_smoothing=0.1)["loss"]

    inputs = tuple(base[k].clone().requires_grad_(True) for k in ("global", "local", "logits"))
    assert torch.autograd.gradcheck(total, inputs)

    partner = {k: v + 0.1 for k, v in base.items()}

    def mutual(g, lf, logits):
        out = {"global": g, "local": lf, "logits": logits}
        return mutual_losses(out, partner, labels, 1., 1., 1.)["loss"]

    assert torch.autograd.gradcheck(mutual, inputs)


def test_mutual_losses_values():
    gen = torch.Generator().manual_seed(10)
    labels = torch.tensor([0, 0, 1, 1])
    out = make_outputs(labels, 1., gen, num_classes=2)
    zero = mutual_losses(out, out, labels, 1., 1., 1.)
    assert zero["loss"].item() == pytest.approx(0., abs=1e-12)
    partner = make_outputs(labels, 2., gen, num_classes=2)
    res = mutual_losses(out, partner, labels, prob_weight=1., global_dist_weight=2.,
                        local_dist_weight=3.)
    p = torch.softmax(partner["logits"], 1)
    kl = (p * (p.log() - torch.log_softmax(out["logits"], 1))).sum(1).mean()
    assert res["prob_mutual_loss"].item() == pytest.approx(kl.item())
    gd = (euclidean_dist(out["global"], out["global"])
          - euclidean_dist(partner["global"], partner["global"])).pow(2).mean()
    assert res["global_dist_mutual_loss"].item() == pytest.approx(gd.item())
    assert res["loss"].item() == pytest.approx(
        (res["prob_mutual_loss"] + 2 * res["global_dist_mutual_loss"]
         + 3 * res["local_dist_mutual_loss"]).item())
    # The partner is a constant: no gradient reaches it.
    partner = {k: v.clone().requires_grad_(True) for k, v in partner.items()}
    g = out["global"].clone().requires_grad_(True)
    mutual_losses({**out, "global": g}, partner, labels, 1., 1., 1.)["loss"].backward()
    assert g.grad is not None and all(v.grad is None for v in partner.values())


