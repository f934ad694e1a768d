"""Fault injection on training and testing (script/train.py, train_ml.py, test.py and the checkpoint, data
and logging code under them): a full disk during a checkpoint save, temporaries of a killed
save, file modes, damaged images, odd flags, a read-only folder, a resumed finished run, test.py's saved
dataset name, multi-query without multi-query images, a bare state dict. Each checks exit code, message
and that nothing was lost."""
import errno
import io
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from aligned_reid import checkpoint, cli, data, files
from aligned_reid.data import read_partitions, write_partitions
from conftest import REPO, TINY, load_script, parse_error, train_in_process

train_script = load_script('script', 'train')
test_script = load_script('script', 'test')


class _FullDisk(io.RawIOBase):
    """A writable file that fails with ENOSPC once `room` bytes are written (the bytes do reach `path`)."""

    def __init__(self, path, room):
        self.f, self.room = open(path, 'wb'), room

    def writable(self):
        return True

    def write(self, b):
        if self.room < len(b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()
        super().close()


def _disk_full_after(monkeypatch, room):
    """aligned_reid.files's open() of atomic_write's temporaries gets a disk with `room` bytes left."""
    def fake_open(path, mode='r', *a, **kw):
        if '.tmp.' in str(path) and 'b' in mode:
            return _FullDisk(path, room)
        return open(path, mode, *a, **kw)
    monkeypatch.setattr(files, 'open', fake_open, raising=False)


# ----------------------------------------------------------------------------- library level

def test_full_disk_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pth'
    checkpoint.save_checkpoint({'epoch': 1, 'w': torch.arange(5.)}, str(path))
    _disk_full_after(monkeypatch, 100)
    with pytest.raises(checkpoint.CheckpointWriteError) as e:
        checkpoint.save_checkpoint({'epoch': 2, 'w': torch.zeros(10000)}, str(path))
    assert e.value.strerror == 'cannot write checkpoint {}: No space left on device; the previous checkpoint {} ' \
                               'is intact'.format(path, path)
    assert e.value.errno == errno.ENOSPC
    state = torch.load(str(path), weights_only=False)
    assert state['epoch'] == 1 and torch.equal(state['w'], torch.arange(5.))
    assert os.listdir(tmp_path) == ['ckpt.pth']  # the temporary is gone
    with pytest.raises(checkpoint.CheckpointWriteError, match='no earlier checkpoint existed'):
        checkpoint.save_checkpoint({'epoch': 1}, str(tmp_path / 'new' / 'ckpt.pth'))


def test_stale_temporaries_are_removed_only_when_their_process_is_gone(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    stale = tmp_path / 'ckpt.pth.tmp.{}'.format(dead.pid)
    stale.write_bytes(b'x' * 1000)
    live = tmp_path / 'ckpt.pth.tmp.{}'.format(os.getpid())
    live.write_bytes(b'y')
    other = tmp_path / 'notes.tmp.txt'
    other.write_bytes(b'z')
    assert files.remove_stale_temp_files(str(tmp_path)) == [(str(stale), 1000)]
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name])
    assert files.remove_stale_temp_files(str(tmp_path / 'missing')) == []


@pytest.mark.parametrize('mask', [0o022, 0o002])
def test_files_get_the_umask_mode(tmp_path, mask, world):
    old = os.umask(mask)
    try:
        write_partitions(read_partitions(world['market']), str(tmp_path / 'partitions.pkl'))
        checkpoint.save_checkpoint({'a': 1}, str(tmp_path / 'ckpt.pth'))
        checkpoint.write_json({'a': 1}, str(tmp_path / 'metrics.json'))
    finally:
        os.umask(old)
    for name in ('partitions.pkl', 'ckpt.pth', 'metrics.json'):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~mask, name


def test_unreadable_image_is_named(tmp_path):
    empty = tmp_path / 'empty.jpg'
    empty.write_bytes(b'')
    with pytest.raises(data.UnreadableImageError, match='cannot read image {}'.format(empty)):
        data._load_rgb(str(empty))
    with pytest.raises(data.UnreadableImageError, match='cannot read image .*missing.jpg'):
        data._load_rgb(str(tmp_path / 'missing.jpg'))
    folded = data.UnreadableImageError('Caught UnreadableImageError in DataLoader worker process 0.\n'
                                       'Original Traceback (most recent call last):\n  File "x", line 1\n'
                                       'aligned_reid.data.UnreadableImageError: cannot read image /a/b.jpg: '
                                       'broken data stream\n')
    assert data.unreadable_image_line(folded) == 'cannot read image /a/b.jpg: broken data stream'


def test_other_ranks_log_errors_only(capsys):
    logger = cli.setup_logging(None, name='robust_rank1', main_process=False)
    logger.info('info line')
    logger.warning('warning line')
    logger.error('error line')
    out = capsys.readouterr().out
    assert 'error line' in out and 'info line' not in out and 'warning line' not in out


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize('argv,message', [
    (['--base_lr', '-1e-3'], '--base_lr must not be negative, got -0.001'),
    (['--weight_decay', '-5E-4'], '--weight_decay must not be negative, got -0.0005'),
    (['-gm', '-.3'], '--global_margin must not be negative, got -0.3'),
    (['--workers', '-2'], '--workers must not be negative, got -2'),
    (['--ids_per_batch', '1'], '--ids_per_batch must be at least 2: hard mining needs another identity'),
    (['--label_smoothing', '1.5'], '--label_smoothing must lie in [0, 1), got 1.5'),
    (['--local_conv_out_channels', '0'], '--local_conv_out_channels must be at least 1, got 0'),
    (['--staircase_decay_multiply_factor', '-0.1'], '--staircase_decay_multiply_factor must be positive, got -0.1'),
])
def test_train_flag_values(argv, message, capsys):
    assert message in parse_error(train_script, argv, capsys)


def test_test_flag_values(world, capsys):
    w = ['--test_partitons', world['market'], '--model_weight_file', world['market']]  # any existing file
    assert '--test_batch_size must be at least 1, got -8' in parse_error(
        test_script, w + ['--test_batch_size', '-8'], capsys)
    assert '--resize_h_w must be at least 16 16, got -64 32' in parse_error(
        test_script, w + ['--resize_h_w', '-64', '32'], capsys)
    assert "--device must be 'cpu'" in parse_error(test_script, w + ['--device', 'tpu'], capsys)


def test_ids_per_batch_share_per_process(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    assert '--ids_per_batch 2 over 2 processes leaves 1 identity per process' in parse_error(
        train_script, ['--train_partitons', world['market'], '--exp_dir', str(tmp_path / 'x'), '--ids_per_batch', '2'],
        capsys)


def test_read_only_experiment_folder(world, tmp_path, capsys, monkeypatch):
    ro = tmp_path / 'ro'
    ro.mkdir()
    real_access = os.access
    # root ignores permission bits, so the test denies write access the way a read-only mount would
    monkeypatch.setattr(os, 'access', lambda p, m: False if os.path.abspath(p) == str(ro) and m & os.W_OK
                        else real_access(p, m))
    base = ['--train_partitons', world['market'], '--ids_per_batch', '4']
    err = parse_error(train_script, base + ['--exp_dir', str(ro)], capsys)
    assert '--exp_dir: {} is not writable (permission denied)'.format(ro) in err
    err = parse_error(train_script, base + ['--exp_dir', str(ro / 'run' / 'a')], capsys)
    assert '{} is not writable (permission denied) and {} would be created in it'.format(ro, ro / 'run' / 'a') in err
    assert os.listdir(ro) == []
    err = parse_error(test_script, ['--test_partitons', world['market'], '--model_weight_file', world['market'],
                                    '--exp_dir', str(ro)], capsys)
    assert '--exp_dir: {} is not writable'.format(ro) in err


# ----------------------------------------------------------------------------- training runs

COMMON = TINY + ['--to_re_rank', 'false']


def test_killed_save_leftover_is_removed_and_reported(world, tmp_path):
    exp = tmp_path / 'run'
    train_in_process(['--train_partitons', world['market'], '--exp_dir', str(exp), '--total_epochs', '1'] + COMMON)
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    leftover = exp / 'ckpt.pth.tmp.{}'.format(dead.pid)
    leftover.write_bytes(b'\0' * (3 * 2 ** 20))
    train_in_process(['--exp_dir', str(exp), '--resume', 'true', '--total_epochs', '2', '--workers', '0'])
    log = open(exp / 'train.log').read()
    assert 'removed {} (3.0 MB): the temporary file of a save that was killed midway'.format(leftover) in log
    assert not leftover.exists()
    assert torch.load(str(exp / 'ckpt.pth'), weights_only=False)['epoch'] == 2


def test_resume_of_a_finished_run_says_so_and_changes_nothing(world, tmp_path, capsys):
    exp = tmp_path / 'done'
    train_in_process(['--train_partitons', world['market'], '--exp_dir', str(exp), '--total_epochs', '1'] + COMMON)
    before = {n: (open(exp / n, 'rb').read(), os.stat(exp / n).st_mtime_ns) for n in ('ckpt.pth', 'metrics.json')}
    capsys.readouterr()
    assert train_in_process(['--exp_dir', str(exp), '--resume', 'true', '--workers', '0']) == []  # no training step
    out = capsys.readouterr().out
    assert 'is already finished (1 of 1 epochs): nothing to train' in out and '--onlytest true' in out
    assert 'Rank-1' not in out  # no final test
    assert {n: (open(exp / n, 'rb').read(), os.stat(exp / n).st_mtime_ns) for n in before} == before


def test_full_disk_during_training_stops_with_one_line_in_the_log(world, tmp_path, monkeypatch):
    exp = tmp_path / 'full'
    saves = []
    real_save = checkpoint.save_checkpoint

    def save(state, path):
        saves.append(state['epoch'])
        if len(saves) == 2:  # the disk fills up before the checkpoint of epoch 2
            _disk_full_after(monkeypatch, 1000)
        return real_save(state, path)
    monkeypatch.setattr(checkpoint, 'save_checkpoint', save)
    argv = ['--train_partitons', world['market'], '--exp_dir', str(exp), '--total_epochs', '3'] + COMMON
    with pytest.raises(SystemExit) as e:
        cli.run_cli(train_script.main, lambda: train_script.parse_args(argv), 'train.py', log_to_file=True)
    ckpt = exp / 'ckpt.pth'
    line = 'cannot write checkpoint {}: No space left on device; the previous checkpoint {} is intact'.format(ckpt, ckpt)
    assert e.value.code == 'train.py: ' + line
    assert line in open(exp / 'train.log').read()
    assert torch.load(str(ckpt), weights_only=False)['epoch'] == 1
    assert sorted(os.listdir(exp)) == ['args.json', 'ckpt.pth', 'tensorboard', 'train.log']
    logging.getLogger('aligned_reid').handlers.clear()


def _damaged_copy(world, tmp_path, split):
    """A copy of the tiny market set whose `split` images are all truncated (a P x K epoch need not read
    every image). Returns (partitions path, images folder)."""
    src = os.path.dirname(world['market'])
    dst = tmp_path / 'set'
    shutil.copytree(src, dst)
    for name in read_partitions(world['market'])[split + '_im_names']:
        victim = dst / 'images' / name
        raw = victim.read_bytes()
        victim.unlink()  # a hard link to the shared set: replace it, do not write through it
        victim.write_bytes(raw[:len(raw) // 3])
    return str(dst / 'partitions.pkl'), dst / 'images'


def test_damaged_image_in_training_and_testing_is_one_line(world, tmp_path):
    parts, images = _damaged_copy(world, tmp_path, 'trainval')
    exp = tmp_path / 'dmg'
    argv = ['--train_partitons', parts, '--exp_dir', str(exp), '--total_epochs', '1'] + COMMON
    argv[argv.index('--workers') + 1] = '1'  # the error comes from a loader worker
    r = subprocess.run([sys.executable, 'script/train.py'] + argv, cwd=str(REPO), env=world['env'],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]  # above it only the progress bar
    assert last.startswith('train.py: cannot read image {}/'.format(images)) and 'truncated' in last.lower(), r.stderr
    assert 'Traceback' not in r.stderr + r.stdout and r.stderr.count('cannot read image') == 1
    assert last[len('train.py: '):] in open(exp / 'train.log').read()
    assert not os.path.exists(exp / 'ckpt.pth')

    good = tmp_path / 'good'
    train_in_process(['--train_partitons', world['market'], '--exp_dir', str(good), '--total_epochs', '1'] + COMMON)
    parts, images = _damaged_copy(world, tmp_path / 't', 'test')
    first = read_partitions(parts)['test_im_names'][0]
    r = subprocess.run([sys.executable, 'script/test.py', '--exp_dir', str(good), '--test_partitons', parts,
                        '--workers', '1', '--to_re_rank', 'false'], cwd=str(REPO), env=world['env'],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith('test.py: cannot read image {}: '.format(images / first)), r.stderr
    assert 'Traceback' not in r.stderr + r.stdout and r.stderr.count('cannot read image') == 1


# ----------------------------------------------------------------------------- test.py

@pytest.fixture(scope='module')
def synthetic_run(world, tmp_path_factory):
    """A one-epoch run trained with --train_dataset synthetic on the tiny market set."""
    exp = tmp_path_factory.mktemp('robust') / 'synthetic_run'
    train_in_process(['--train_dataset', 'synthetic', '--train_partitons', world['market'], '--exp_dir', str(exp),
                      '--total_epochs', '1', '--final_test', 'false'] + COMMON)
    return exp


def test_test_script_takes_the_dataset_from_the_saved_run(world, synthetic_run, capsys):
    args = test_script.parse_args(['--exp_dir', str(synthetic_run), '--workers', '0', '--to_re_rank', 'false',
                                   '--num_vis_queries', '1', '--device', 'cpu'])
    assert (args.train_dataset, args.test_dataset, args.test_partitions) == ('synthetic', 'synthetic', world['market'])
    test_script.main(args)
    out = capsys.readouterr().out
    assert 'train synthetic -> test synthetic' in out and 'input 64 x 32' in out
    saved = json.load(open(synthetic_run / 'metrics.json'))
    assert saved['train_dataset'] == saved['test_dataset'] == 'synthetic'
    assert saved['resize_h_w'] == [64, 32] and saved['flip'] is False
    assert os.path.isdir(synthetic_run / 'ranks_synthetic') and not os.path.exists(synthetic_run / 'ranks_market1501')
    # an explicit --train_dataset still wins
    args = test_script.parse_args(['--exp_dir', str(synthetic_run), '--train_dataset', 'duke', '--test_partitons',
                                   world['duke']])
    assert (args.train_dataset, args.test_dataset) == ('duke', 'duke')


def test_missing_exp_dir_is_named(tmp_path, capsys, world):
    err = parse_error(test_script, ['--exp_dir', str(tmp_path / 'nothing'), '--test_partitons', world['market']],
                      capsys)
    assert '--exp_dir {}: no trained model there'.format(tmp_path / 'nothing') in err
    assert 'no trained model for --train_dataset' not in err


def test_multi_query_without_multi_query_images_is_an_error(world, synthetic_run, tmp_path):
    part = read_partitions(world['market'])
    keep = [i for i, m in enumerate(part['test_marks']) if m != 2]
    part['test_im_names'] = [part['test_im_names'][i] for i in keep]
    part['test_marks'] = [part['test_marks'][i] for i in keep]
    (tmp_path / 'sq').mkdir()
    os.symlink(os.path.join(os.path.dirname(world['market']), 'images'), tmp_path / 'sq' / 'images')
    write_partitions(part, str(tmp_path / 'sq' / 'partitions.pkl'))
    out = tmp_path / 'out'
    r = subprocess.run([sys.executable, 'script/test.py', '--model_weight_file', str(synthetic_run / 'ckpt.pth'),
                        '--exp_dir', str(out), '--test_dataset', 'single', '--test_partitons',
                        str(tmp_path / 'sq' / 'partitions.pkl'), '--multi_query', 'avg', '--workers', '0'],
                       cwd=str(REPO), env=world['env'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip() == ('test.py: --multi_query avg: {} holds no multi-query images (mark 2, the gt_bbox/ '
                                'images of Market-1501); use --multi_query none'.format(tmp_path / 'sq' / 'partitions.pkl'))
    assert not out.exists() or not [n for n in os.listdir(out) if n.startswith('metrics')]


def test_bare_state_dict_warns_with_the_size_used(world, synthetic_run, tmp_path, capsys):
    bare = tmp_path / 'bare.pth'
    torch.save(torch.load(str(synthetic_run / 'ckpt.pth'), weights_only=False)['model'], str(bare))
    base = ['--model_weight_file', str(bare), '--exp_dir', str(tmp_path / 'o'), '--test_partitons', world['market'],
            '--base_model', 'resnet18', '--workers', '0', '--to_re_rank', 'false', '--device', 'cpu']
    test_script.main(test_script.parse_args(base + ['--flip', 'true']))
    out = capsys.readouterr().out
    assert 'holds no input size (a bare state dict?): testing at 256 x 128; give --resize_h_w H W' in out
    assert 'input 256 x 128, flip on' in out
    saved = json.load(open(tmp_path / 'o' / 'metrics.json'))
    assert saved['resize_h_w'] == [256, 128] and saved['flip'] is True
    test_script.main(test_script.parse_args(base + ['--resize_h_w', '64', '32']))
    out = capsys.readouterr().out
    assert 'holds no input size' not in out and 'input 64 x 32, flip off' in out
    assert json.load(open(tmp_path / 'o' / 'metrics.json'))['resize_h_w'] == [64, 32]


def test_train_ml_resume_of_a_finished_run(world, tmp_path):
    exp = tmp_path / 'ml'
    base = [sys.executable, 'script/train_ml.py', '--exp_dir', str(exp)]
    r = subprocess.run(base + ['--train_partitons', world['market'], '--total_epochs', '1', '-pmlw', '0']
                       + COMMON + ['--final_test', 'false'], cwd=str(REPO), env=world['env'], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    before = open(exp / 'ckpt.pth', 'rb').read()
    r = subprocess.run(base + ['--resume', 'true', '--workers', '0'], cwd=str(REPO), env=world['env'],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'is already finished (1 of 1 epochs): nothing to train' in r.stdout
    assert open(exp / 'ckpt.pth', 'rb').read() == before and not (exp / 'metrics.json').exists()


def test_periodic_test_needs_a_split_to_test_on(world, tmp_path, capsys):
    part = read_partitions(world['market'])
    trainval_only = {k: v for k, v in part.items() if k.startswith('trainval') or k in ('format_version', 'dataset')}
    write_partitions(trainval_only, str(tmp_path / 'partitions.pkl'))
    err = parse_error(train_script, ['--train_partitons', str(tmp_path / 'partitions.pkl'), '--ids_per_batch', '4',
                                     '--exp_dir', str(tmp_path / 'x'), '--epochs_per_test', '1'], capsys)
    assert '--epochs_per_test 1: {} has no test split to test on'.format(tmp_path / 'partitions.pkl') in err
