"""Tests of the checkpoint layouts: train.py and train_ml.py write one layout (aligned_reid.checkpoint.KEYS),
and the two layouts the code before it wrote (train.py: 'optimizer' / 'scaler'; train_ml.py: lists, no
'best_metric') still resume exactly and test."""
import json

import pytest
import torch

from aligned_reid import checkpoint
from conftest import load_script

train_script = load_script('script', 'train')
train_ml_script = load_script('script', 'train_ml')
test_script = load_script('script', 'test')
TINY = ['--base_model', 'resnet18', '--resize_h_w', '64', '32', '--ids_per_batch', '4', '--ims_per_id', '2',
        '--pretrained', 'false', '--workers', '0', '--seed', '3', '--device', 'cpu', '--to_re_rank', 'false']

pytestmark = pytest.mark.usefixtures('one_torch_thread')


@pytest.fixture
def partitions(market_with_raw):
    return market_with_raw['partitions']


def _load(path):
    return torch.load(str(path), map_location='cpu', weights_only=False)


def _old_train_layout(state):
    """What train.py wrote before the one layout (8a7179c)."""
    return {'model': state['model'], 'optimizer': state['optimizers'][0], 'scaler': state['scalers'][0],
            'epoch': state['epoch'], 'step_in_epoch': state['step_in_epoch'], 'best_metric': state['best_metric'],
            'args': state['args'], 'rng': state['rng'], 'world_size': state['world_size']}


def _old_train_ml_layout(state):
    """What train_ml.py wrote before the one layout (8a7179c): no best metric."""
    return {'model': state['models'][0], 'models': state['models'], 'optimizers': state['optimizers'],
            'scalers': state['scalers'], 'epoch': state['epoch'], 'step_in_epoch': state['step_in_epoch'],
            'args': state['args'], 'rng': state['rng'], 'world_size': state['world_size']}


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('script, flags, old_layout', [
    (train_script, ['-llw', '0'], _old_train_layout),
    (train_ml_script, ['-llw', '0', '-gdmlw', '1'], _old_train_ml_layout),
], ids=['train', 'train_ml'])
def test_files_of_the_earlier_layouts_resume_exactly_and_test(partitions, tmp_path, script, flags, old_layout):
    common = ['--train_partitons', partitions] + TINY + flags
    script.main(script.parse_args(common + ['--exp_dir', str(tmp_path / 'new'), '--total_epochs', '1',
                                            '--final_test', 'false']))
    new = _load(tmp_path / 'new' / 'ckpt.pth')
    assert tuple(new) == checkpoint.KEYS and new['model'] is new['models'][0]
    old_dir = tmp_path / 'old'
    old_dir.mkdir()
    torch.save(old_layout(new), str(old_dir / 'ckpt.pth'))

    # both resume to the same weights, bit for bit
    for folder in ('new', 'old'):
        script.main(script.parse_args(['--exp_dir', str(tmp_path / folder), '--resume', 'true', '--total_epochs',
                                       '2', '--final_test', 'false', '--workers', '0']))
    a, b = _load(tmp_path / 'new' / 'ckpt.pth'), _load(tmp_path / 'old' / 'ckpt.pth')
    assert a['epoch'] == b['epoch'] == 2
    for sa, sb in zip(a['models'], b['models']):
        assert _same(sa, sb)
    assert len(a['models']) == (2 if script is train_ml_script else 1)

    # test.py reads both layouts (and model 2 of a mutual-learning file)
    torch.save(old_layout(a), str(old_dir / 'ckpt.pth'))
    indices = (1, 2) if script is train_ml_script else (1,)
    for folder in ('new', 'old'):
        for index in indices:
            args = test_script.parse_args(['--exp_dir', str(tmp_path / folder), '--test_partitons', partitions,
                                           '--to_re_rank', 'false', '--workers', '0', '--model_index', str(index)])
            model, cfg = test_script.load_model(args, torch.device('cpu'))
            assert cfg['resize_h_w'] == [64, 32]
            assert _same(model.state_dict(), {k: v for k, v in a['models'][index - 1].items()
                                              if not k.startswith('classifier.')})
    test_script.main(test_script.parse_args(['--exp_dir', str(old_dir), '--test_partitons', partitions,
                                             '--to_re_rank', 'false', '--workers', '0']))
    assert json.load(open(old_dir / 'metrics.json'))['results']['global']['rank1'] >= 0


def test_training_state_and_resume_state_round_trip():
    models = [torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)]
    optimizers = [torch.optim.Adam(m.parameters()) for m in models]
    state = checkpoint.training_state(models, optimizers, [None, None], 4, 7, {'rank1': 0.5}, {'seed': 1},
                                      [checkpoint.get_rng_state()], 1)
    assert tuple(state) == checkpoint.KEYS
    back = checkpoint.resume_state(state)
    assert (back['epoch'], back['step_in_epoch'], back['best_metric']) == (4, 7, {'rank1': 0.5})
    assert len(back['optimizers']) == 2 and back['scalers'] == [None, None]
    old = checkpoint.resume_state({'optimizer': optimizers[0].state_dict(), 'scaler': None, 'epoch': 3})
    assert len(old['optimizers']) == 1 and old['step_in_epoch'] == 0 and old['best_metric'] is None
    with pytest.raises(ValueError, match='no optimizer state'):
        checkpoint.resume_state({'model': models[0].state_dict(), 'epoch': 1})
