"""Tests of mutual learning as the older reproduction ran it: train_ml.py --same_init starts both models from
the same weights, so the global-distance mutual loss is exactly 0 at step 0; the local-distance mutual loss
needs --local_dist_own_hard_sample true (refused otherwise), and then equals a brute-force reference."""
import math

import pytest
import torch

from aligned_reid.loss import compute_losses, mutual_learning_losses
from conftest import load_script, main_with_fit, parse_error

train_ml = load_script('script', 'train_ml')

LOSSES = dict(global_margin=0.3, local_margin=0.3, global_loss_weight=1., local_loss_weight=0., id_loss_weight=0.,
              normalize_feature=False, local_dist_own_hard_sample=False, label_smoothing=0., check_batch=False)


@pytest.fixture
def partitions(market_with_raw):
    return market_with_raw['partitions']


def first_step(partitions, exp_dir, *flags):
    """(models, the loss dicts of the first training step) of train_ml.py with `flags`: the epoch loop is
    replaced by one forward pass of both models on the loader's first batch, in training mode."""
    seen = {}

    def fit(args, run, models, optimizers, scalers, loader, step_losses, *rest, **kw):
        loader.set_epoch(1, 0)
        images, labels = next(iter(loader))
        for m in models:
            m.train()
        seen['models'] = models
        seen['results'] = step_losses([m(images) for m in models], labels)

    argv = ['--train_partitons', partitions, '--exp_dir', str(exp_dir), '--base_model', 'resnet18',
            '--pretrained', 'false', '--resize_h_w', '32', '16', '--ids_per_batch', '3', '--ims_per_id', '2',
            '--total_epochs', '1', '--final_test', 'false', '--device', 'cpu', '--workers', '0',
            '-glw', '1', '-llw', '0', '-idlw', '0', '-pmlw', '0', '-gdmlw', '1', '-ldmlw', '0'] + list(flags)
    main_with_fit(train_ml, argv, fit)
    return seen['models'], seen['results']


def test_same_init_starts_equal_and_the_global_mutual_loss_at_0(partitions, tmp_path, one_torch_thread):
    models, results = first_step(partitions, tmp_path / 'same', '--same_init', 'true')
    a, b = (m.state_dict() for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for r in results:
        assert r['global_dist_mutual_loss'].item() == 0.
        assert r['loss'].item() == r['own_loss'].item() == r['global_loss'].item() > 0


def test_different_starts_by_default(partitions, tmp_path, one_torch_thread):
    models, results = first_step(partitions, tmp_path / 'diff')
    a, b = (m.state_dict() for m in models)
    assert not torch.equal(a['base.conv1.weight'], b['base.conv1.weight'])
    assert all(r['global_dist_mutual_loss'].item() > 0 for r in results)


def test_local_mutual_loss_needs_own_hard_samples(partitions, tmp_path, capsys):
    base = ['--train_partitons', partitions, '--exp_dir', str(tmp_path / 'e'), '--device', 'cpu', '-llw', '1',
            '--ids_per_batch', '2']
    line = parse_error(train_ml, base + ['-ldmlw', '0.5'], capsys).strip()
    assert (' error: -ldmlw 0.5 needs --local_dist_own_hard_sample true, as in the older reproduction, '
            'which computes the local-distance mutual loss only then (0 otherwise); give '
            '--local_dist_own_hard_sample true, or -ldmlw 0; see ') in line
    args = train_ml.parse_args(base + ['-ldmlw', '0.5', '--local_dist_own_hard_sample', 'true'])
    assert args.local_dist_mutual_loss_weight == 0.5 and args.same_init is False
    assert train_ml.parse_args(base + ['-ldmlw', '0']).local_dist_mutual_loss_weight == 0.


def brute_local_dist(x, y):
    """The aligned local distance of two [m, d] stripe sets: element distances (e^d - 1) / (e^d + 1) and the
    shortest right / down path from the top-left to the bottom-right cell, by plain recursion."""
    m, n = len(x), len(y)
    d = [[math.tanh(float((x[i] - y[j]).norm()) / 2) for j in range(n)] for i in range(m)]
    s = [[0.] * n for _ in range(m)]
    for i in range(m):
        for j in range(n):
            prev = [s[i - 1][j]] * (i > 0) + [s[i][j - 1]] * (j > 0)
            s[i][j] = d[i][j] + (min(prev) if prev else 0.)
    return s[-1][-1]


def test_local_mutual_term_rule_and_value():
    gen = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    outputs = [{'global': torch.randn(6, 5, generator=gen, dtype=torch.float64),
                'local': torch.rand(6, 3, 4, generator=gen, dtype=torch.float64)} for _ in range(2)]
    mutual = dict(prob_weight=0., global_dist_weight=0., local_dist_weight=2.)
    with pytest.raises(ValueError, match='needs --local_dist_own_hard_sample true'):
        mutual_learning_losses(outputs, labels, dict(LOSSES, local_loss_weight=1.), mutual)
    losses = dict(LOSSES, local_loss_weight=1., local_dist_own_hard_sample=True)
    results = mutual_learning_losses(outputs, labels, losses, mutual)
    for i, r in enumerate(results):
        own, partner = outputs[i]['local'], outputs[1 - i]['local']
        expected = sum((brute_local_dist(own[a], own[b]) - brute_local_dist(partner[a], partner[b])) ** 2
                       for a in range(6) for b in range(6)) / 36
        assert r['local_dist_mutual_loss'].item() == pytest.approx(expected, rel=1e-5)
        assert r['loss'].item() == pytest.approx(compute_losses(outputs[i], labels, **losses)['loss'].item()
                                                 + 2 * expected, rel=1e-5)
    # Without the local-distance weight the combination is fine whatever the mining.
    assert 'local_dist_mutual_loss' not in mutual_learning_losses(
        outputs, labels, dict(LOSSES, local_loss_weight=1.), dict(mutual, local_dist_weight=0.))[0]
