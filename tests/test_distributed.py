"""Tests of aligned_reid.distributed: the single-process helpers, the variable-size all_gather and mean of
two gloo processes, and the stop when torchrun starts more processes than there are GPUs."""
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from aligned_reid import distributed
from conftest import free_port


def test_single_process_helpers():
    assert distributed.init_distributed('cpu') == (0, 1, 0) or os.environ.get('WORLD_SIZE', '1') != '1'
    assert distributed.is_main() and distributed.get_world_size() == 1
    x = np.arange(5)
    assert np.array_equal(distributed.all_gather_arrays(x), x)
    distributed.barrier()


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
    mp.spawn(_gather_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
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
