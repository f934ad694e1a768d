"""Tests of aligned_reid.engine on the CPU: train_one_epoch with a tiny model (one device-to-host read per
step, statistics stay on the device; a non-finite loss stops the run before the update that would use it),
seeding, the exp and staircase learning-rate schedules, and AMP on the CPU."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from aligned_reid import engine
from aligned_reid.loss import compute_losses

READS = ('item', 'tolist', '__float__', '__int__', '__bool__', 'numpy', 'cpu', 'nonzero')


class Tiny(nn.Module):
    """Global [N, 8] and local [N, 4, 8] features from [N, 3, 16, 8] images."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        f = self.conv(x)                                   # [N, 8, 16, 8]
        return {'global': f.mean((2, 3)), 'local': f.view(len(x), 8, 4, -1).mean(3).transpose(1, 2)}


class Batches:
    """The loader interface train_one_epoch uses: P x K batches of random images."""

    def __init__(self, steps=4, ids=4, per_id=2):
        self.steps, self.ids, self.per_id = steps, ids, per_id

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start = epoch, start_step

    def __len__(self):
        return self.steps

    def __iter__(self):
        g = torch.Generator().manual_seed(self.epoch)
        for _ in range(self.start, self.steps):
            yield (torch.randn(self.ids * self.per_id, 3, 16, 8, generator=g),
                   torch.arange(self.ids).repeat_interleave(self.per_id))


LOSSES = dict(global_margin=0.3, local_margin=0.3, global_loss_weight=1., local_loss_weight=1., id_loss_weight=0.,
              normalize_feature=False, local_dist_own_hard_sample=False, label_smoothing=0., check_batch=False)


def one_model(compute=compute_losses):
    """The step_losses of one model trained with `compute`."""
    return lambda outputs, labels: [compute(outputs[0], labels, **LOSSES)]


def test_one_read_per_step(monkeypatch):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    counting = [True]
    reads = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, _original=original, _name=name, **kw):
            if counting[0]:
                reads.append(_name)
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    step = opt.step

    def uncounted_step(*a, **kw):  # the optimizer's own bookkeeping (a CPU step counter) is not ours
        counting[0] = False
        try:
            return step(*a, **kw)
        finally:
            counting[0] = True
    monkeypatch.setattr(opt, 'step', uncounted_step)
    stats, n_images, steps, stopped, _ = engine.train_one_epoch(
        [model], Batches(steps=4), [opt], [None], torch.device('cpu'), 1, one_model())
    assert (steps, stopped, n_images) == (4, False, 32)
    assert reads == ['tolist'] * 5, reads     # one per step, one for the epoch's means
    for k in ('loss', 'global_loss', 'local_loss', 'global_prec', 'local_dist_an', 'data_wait', 'first_batch_s'):
        assert isinstance(stats[k], float), k


def test_non_finite_loss_stops_before_the_update():
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    seen = []

    def poisoned(outputs, labels, **kw):
        result = compute_losses(outputs, labels, **kw)
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if len(seen) == 3:
            result['local_loss'] = result['local_loss'] * float('inf')
            result['loss'] = result['loss'] + result['local_loss']
        return result
    with pytest.raises(engine.NonFiniteLoss, match='local_loss = inf at epoch 2 step 3/4'):
        engine.train_one_epoch([model], Batches(), [opt], [None], torch.device('cpu'), 2, one_model(poisoned))
    assert not all(torch.equal(seen[1][k], seen[2][k]) for k in seen[1])   # step 2 did update
    assert all(torch.equal(v, seen[2][k]) for k, v in model.state_dict().items())   # step 3 did not


# ----------------------------------------------------------------------------- seeding, lr schedules, AMP

def test_set_seed_reproducible():
    engine.set_seed(11)
    x = torch.randn(4)
    engine.set_seed(11)
    assert torch.equal(x, torch.randn(4))


def test_exp_schedule_original_figures():
    base = 2e-4
    for ep in (1, 50, 150):
        assert engine.lr_at_epoch('exp', base, ep, 300, exp_decay_at_epoch=151) == base
    # reaches 1e-3 x base at the last epoch, strictly decreasing in between
    assert math.isclose(engine.lr_at_epoch('exp', base, 300, 300, exp_decay_at_epoch=151), base * 1e-3)
    lrs = [engine.lr_at_epoch('exp', base, ep, 300, exp_decay_at_epoch=151) for ep in range(150, 301)]
    assert all(b < a for a, b in zip(lrs, lrs[1:]))
    # brute-force reference of the formula
    ep = 200
    ref = base * 0.001 ** ((ep + 1 - 151) / (300 + 1 - 151))
    assert math.isclose(engine.lr_at_epoch('exp', base, ep, 300, exp_decay_at_epoch=151), ref)


def test_staircase_schedule():
    base = 1.0
    got = [engine.lr_at_epoch('staircase', base, ep, 10, staircase_decay_at_epochs=(4, 8),
                             staircase_decay_multiply_factor=0.1) for ep in range(1, 11)]
    want = [1, 1, 1, .1, .1, .1, .1, .01, .01, .01]
    assert np.allclose(got, want)


def test_unknown_schedule():
    with pytest.raises(ValueError, match='staircase'):
        engine.lr_at_epoch('cosine', 1., 1, 10)


def test_set_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.)
    engine.set_lr(opt, 0.25)
    assert opt.param_groups[0]['lr'] == 0.25


def test_amp_is_a_warned_no_op_on_cpu():
    from aligned_reid import cli, engine
    logger = cli.setup_logging(None, name='test_scripts_amp')
    with pytest.warns(UserWarning, match='--amp has no effect on the CPU'):
        assert engine.amp_settings(True, torch.device('cpu'), logger) == (None, [None])
    assert engine.amp_settings(False, torch.device('cpu'), logger, num_models=2) == (None, [None, None])
