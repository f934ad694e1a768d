"""Tests of aligned_reid.utils: boolean words, atomic checkpoints, RNG capture, lr schedules,
logging and the variable-size all_gather (two gloo processes)."""
import math
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from aligned_reid import checkpoint, cli, distributed, engine


@pytest.mark.parametrize('word,value', [
    ('true', True), ('True', True), ('TRUE', True), ('yes', True), ('Yes', True), ('1', True),
    ('false', False), ('False', False), ('no', False), ('NO', False), ('0', False), (True, True), (False, False),
])
def test_str2bool_words(word, value):
    assert cli.str2bool(word) is value


@pytest.mark.parametrize('word', ['maybe', '', '2', 'tru'])
def test_str2bool_rejects(word):
    with pytest.raises(ValueError, match='boolean'):
        cli.str2bool(word)


def test_checkpoint_roundtrip_and_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / 'sub' / 'ckpt.pth')
    state = {'model': {'w': torch.arange(6.).view(2, 3)}, 'epoch': 3, 'args': {'a': 1}}
    checkpoint.save_checkpoint(state, path)
    back = checkpoint.load_file(path)
    assert back['epoch'] == 3 and torch.equal(back['model']['w'], state['model']['w'])
    assert os.listdir(os.path.dirname(path)) == ['ckpt.pth']  # no temporary left over

    # A crash while writing keeps the previous checkpoint intact and leaves no temporary file.
    def boom(*a, **k):
        raise RuntimeError('disk full')
    monkeypatch.setattr(torch, 'save', boom)
    with pytest.raises(RuntimeError):
        checkpoint.save_checkpoint({'epoch': 4}, path)
    monkeypatch.undo()
    assert checkpoint.load_file(path)['epoch'] == 3
    assert os.listdir(os.path.dirname(path)) == ['ckpt.pth']


def test_load_checkpoint_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        checkpoint.load_file(str(tmp_path / 'nope.pth'))


def test_rng_state_roundtrip():
    engine.set_seed(5)
    state = checkpoint.get_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(7)  # move on
    checkpoint.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


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


def test_logging_to_file(tmp_path, capsys):
    log_file = str(tmp_path / 'log' / 'train.log')
    logger = cli.setup_logging(log_file, name='test_utils_logger')
    logger.info('hello %d', 7)
    for h in logger.handlers:
        h.flush()
    assert 'hello 7' in open(log_file).read()
    assert 'hello 7' in capsys.readouterr().out
    quiet = cli.setup_logging(str(tmp_path / 'other.log'), name='test_utils_quiet', main_process=False)
    quiet.info('hidden')
    assert not os.path.exists(tmp_path / 'other.log')


def test_single_process_helpers():
    assert distributed.init_distributed('cpu') == (0, 1, 0) or os.environ.get('WORLD_SIZE', '1') != '1'
    assert distributed.is_main() and distributed.get_world_size() == 1
    x = np.arange(5)
    assert np.array_equal(distributed.all_gather_arrays(x), x)
    distributed.barrier()


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _gather_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    distributed.init_distributed('cpu')
    n = 2 + 3 * rank  # different sizes per rank
    feats = {'global': np.full((n, 4), rank, np.float32), 'ids': np.arange(n) + 100 * rank,
             'local': torch.full((n, 2, 3), float(rank))}
    got = distributed.all_gather_feature_dict(feats)
    means = distributed.reduce_mean_scalars({'loss': float(rank)})
    if rank == 0:
        np.savez(os.path.join(out_dir, 'out.npz'), mean=means['loss'], **got)
    distributed.barrier()
    distributed.cleanup_distributed()


def test_all_gather_variable_size_two_processes(tmp_path):
    mp.spawn(_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    got = np.load(tmp_path / 'out.npz')
    assert got['global'].shape == (2 + 5, 4)
    assert np.array_equal(got['global'][:, 0], [0, 0, 1, 1, 1, 1, 1])
    assert np.array_equal(got['ids'], [0, 1, 100, 101, 102, 103, 104])
    assert got['local'].shape == (7, 2, 3)
    assert float(got['mean']) == 0.5


def test_torchrun_with_more_processes_than_gpus_says_what_to_pass(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '3')
    monkeypatch.setenv('LOCAL_RANK', '0')
    distributed.check_gpu_count(1)   # enough
    with pytest.raises(SystemExit) as e:
        distributed.check_gpu_count(2)
    assert e.value.code == ('torchrun started 2 processes on this machine, but it sees 1 GPU(s) '
                            '(CUDA_VISIBLE_DEVICES=3): pass --nproc_per_node=1 or fewer, or --device cpu')
    monkeypatch.setenv('LOCAL_RANK', '1')   # the other ranks leave quietly
    with pytest.raises(SystemExit) as e:
        distributed.check_gpu_count(2)
    assert e.value.code == 1
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setenv('LOCAL_RANK', '0')
    with pytest.raises(SystemExit, match='sees 0 GPU.*pass --device cpu$'):
        distributed.check_gpu_count(1)
