"""Ctrl-C at work: training (one SIGINT or a double one: said at once, checkpoint saved, resumable; a later second
one aborts and keeps the last checkpoint) and dataset preparation (one line, nothing half-written left, a rerun
that says what it found)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from aligned_reid import engine, synthetic
from aligned_reid import prepare as prepare_lib
from aligned_reid.data import read_partitions
from aligned_reid.prepare import prepare_market_layout
from aligned_reid.synthetic import render_market_tree
from conftest import REPO, load_script

train_script = load_script('script', 'train')
synthetic_prepare = load_script('data_set', 'synthetic_prepare')
ENV = dict(os.environ, PYTHONUNBUFFERED='1',
           PYTHONPATH=os.pathsep.join([str(REPO)] + os.environ.get('PYTHONPATH', '').split(os.pathsep)))


# ----------------------------------------------------------------------------- training

def test_stop_flag_says_what_it_does(tmp_path, capfd, monkeypatch):
    """The handler itself: the first signal asks for a stop and says so; a second within GRACE_S is the same
    request; a later one restores the default action and re-sends the signal (abort), saying the last checkpoint
    is kept."""
    ckpt = tmp_path / 'ckpt.pth'
    ckpt.write_bytes(b'saved before')
    stop = engine.StopFlag('train.py', str(ckpt))
    stop(signal.SIGINT, None)
    err = capfd.readouterr().err
    assert stop.requested and stop.signum == signal.SIGINT
    assert 'train.py: SIGINT: stopping after this training step and saving a checkpoint to {}'.format(ckpt) in err
    assert 'a second Ctrl-C, 2 s or more after this one, stops at once without saving' in err
    stop(signal.SIGINT, None)
    assert 'SIGINT again within 2 s: taken for the same request' in capfd.readouterr().err
    sent, handlers = [], []
    monkeypatch.setattr(engine.os, 'kill', lambda pid, signum: sent.append((pid, signum)))
    monkeypatch.setattr(engine.signal, 'signal', lambda signum, handler: handlers.append((signum, handler)))
    stop.first -= stop.GRACE_S
    stop(signal.SIGINT, None)
    assert sent == [(os.getpid(), signal.SIGINT)] and handlers == [(signal.SIGINT, signal.SIG_DFL)]
    assert 'SIGINT again: stopping now without saving; {} keeps the last checkpoint saved'.format(ckpt) in \
        capfd.readouterr().err


@pytest.fixture(scope='module')
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp('interrupt')
    render_market_tree(str(root / 'raw'), num_train_ids=8, num_test_ids=3, ims_per_id_cam=2, num_cams=2,
                       im_size=(32, 16), seed=1)
    prepare_market_layout(str(root / 'raw'), str(root / 'set'), dataset='synthetic', num_val_ids=0, verbose=False)
    return str(root / 'set' / 'partitions.pkl')


TRAIN = ['--base_model', 'resnet18', '--pretrained', 'false', '--resize_h_w', '32', '16', '--ids_per_batch', '2',
         '--ims_per_id', '2', '--device', 'cpu', '--workers', '0', '--final_test', 'false']


@pytest.mark.parametrize('signals', [1, 2])
def test_ctrl_c_saves_a_resumable_checkpoint(tiny_set, tmp_path, signals):
    """A real train.py gets SIGINT during its first epoch (and, for a double Ctrl-C, another 0.3 s later): the
    first says at once that it saves and stops, the run saves mid-epoch and exits 130, and the run resumes."""
    exp = tmp_path / 'run'
    proc = subprocess.Popen([sys.executable, 'script/train.py', '--train_partitons', tiny_set, '--exp_dir', str(exp),
                             '--total_epochs', '50', '--steps_per_log', '1'] + TRAIN, cwd=str(REPO), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if 'epoch 1 step 1/' in line:
                break
        proc.send_signal(signal.SIGINT)
        if signals == 2:
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    # A second Ctrl-C that lands once Python's finalization has reset its handlers ends the exit by SIGINT
    # itself, after the save: -2 here, the same status 130 as the first in a shell.
    assert proc.returncode == 130 or (signals == 2 and proc.returncode == -signal.SIGINT), out + err
    assert 'train.py: SIGINT: stopping after this training step and saving a checkpoint to {}'.format(
        exp / 'ckpt.pth') in err
    if signals == 1:  # (two signals may reach the handler as one when the first waits on a long operation)
        assert 'again' not in err
    assert 'Traceback' not in err and 'stopped by signal 2' in out and 'checkpoint saved to' in out
    state = torch.load(str(exp / 'ckpt.pth'), map_location='cpu', weights_only=False)
    assert (state['epoch'], state['step_in_epoch'] > 0) in ((0, True), (1, False))

    train_script.main(train_script.parse_args(['--exp_dir', str(exp), '--resume', 'true', '--total_epochs', '1',
                                               '--device', 'cpu', '--workers', '0']))
    assert torch.load(str(exp / 'ckpt.pth'), map_location='cpu', weights_only=False)['epoch'] == 1


@pytest.mark.parametrize('script,argv,line', [
    ('test.py', ['--exp_dir', '{exp}', '--test_partitons', '{set}', '--workers', '0', '--to_re_rank', 'false'],
     'test.py: interrupted; metrics.json is written only once the evaluation completes'),
    ('extract.py', ['--model', '{exp}', '--partitions', '{set}', '--output', '{out}', '--workers', '0'],
     'extract.py: interrupted; the chunks written so far are kept: rerun the same command to continue')])
def test_ctrl_c_of_a_test_or_extraction_is_one_line(tiny_set, tmp_path, monkeypatch, capsys, script, argv, line):
    """A Ctrl-C while the features are extracted (raised where the loader starts): one line, exit status 130,
    and no metrics.json."""
    import runpy
    from aligned_reid import evaluation, inference
    exp = tmp_path / 'run'
    train_script.main(train_script.parse_args(['--train_partitons', tiny_set, '--exp_dir', str(exp),
                                               '--total_epochs', '1'] + TRAIN))

    def ctrl_c(loader):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluation, 'started', ctrl_c)
    monkeypatch.setattr(inference, 'started', ctrl_c)
    monkeypatch.setattr(sys, 'argv', [script] + [a.format(exp=exp, set=tiny_set, out=tmp_path / 'f.h5') for a in argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / 'script' / script), run_name='__main__')
    assert e.value.code == 130
    err = capsys.readouterr().err.splitlines()
    assert [x for x in err if x.strip() and '%|' not in x] == [line]   # beside tqdm's progress bar
    assert not (exp / 'metrics.json').exists()


# ----------------------------------------------------------------------------- preparation

SMALL = ['--num_train_ids', '8', '--num_test_ids', '4', '--ims_per_id_cam', '2', '--num_cams', '2',
         '--im_size', '32', '16']


def _prepare(argv):
    """data_set/synthetic_prepare.py as its __main__ runs it (prepare.run_cli)."""
    try:
        prepare_lib.run_cli(lambda: synthetic_prepare.main(argv))
    except KeyboardInterrupt:
        pytest.fail('the Ctrl-C reached the user as a KeyboardInterrupt traceback')


def _interrupt_after(monkeypatch, module, name, calls):
    """module.name raises KeyboardInterrupt (a Ctrl-C) at its `calls`-th call."""
    real, count = getattr(module, name), []

    def wrapped(*args, **kwargs):
        count.append(1)
        if len(count) == calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapped)


def test_interrupted_render_leaves_nothing_and_the_rerun_renders(tmp_path, monkeypatch, capsys):
    save = tmp_path / 'syn'
    argv = ['--save_dir', str(save), '--seed', '3'] + SMALL
    _interrupt_after(monkeypatch, synthetic, '_render_job', 5)
    with pytest.raises(SystemExit) as e:
        _prepare(argv)
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err.strip() == 'error: ' + prepare_lib.INTERRUPTED
    assert sorted(os.listdir(save)) == []  # no raw/, raw.partial/, images/
    monkeypatch.undo()
    _prepare(argv)
    assert 'rendering into' in capsys.readouterr().out
    assert synthetic.render_state(str(save / 'raw'))[0] == 'complete' and read_partitions(str(save / 'partitions.pkl'))


def test_rerun_says_what_it_found(tmp_path, monkeypatch, capsys):
    save = tmp_path / 'syn'
    argv = ['--save_dir', str(save)] + SMALL
    # a hard kill mid-render leaves the tree being rendered: the rerun removes it and says so
    (save / 'raw.partial' / 'query').mkdir(parents=True)
    # and Ctrl-C while preparing: the complete render stays, the prepared set is not there
    _interrupt_after(monkeypatch, prepare_lib, 'write_images', 1)
    with pytest.raises(SystemExit):
        _prepare(argv)
    out = capsys.readouterr().out
    assert 'removed {}: the incomplete render of an interrupted run'.format(save / 'raw.partial') in out
    assert sorted(os.listdir(save)) == ['raw']
    monkeypatch.undo()
    monkeypatch.setattr(synthetic_prepare, 'render_market_tree', lambda *a, **k: pytest.fail('rendered again'))
    _prepare(argv)
    assert '{} holds a complete render of these settings (an earlier run stopped before preparing it): ' \
           'preparing it'.format(save / 'raw') in capsys.readouterr().out
    assert sorted(os.listdir(save)) == ['images', 'partitions.pkl', 'raw']
    with pytest.raises(SystemExit) as e:
        _prepare(argv)
    assert e.value.code == 'error: {} already holds a prepared set ({}, {}); pass --overwrite to replace it'.format(
        save, save / 'partitions.pkl', save / 'images')
    with pytest.raises(SystemExit) as e:
        _prepare(['--save_dir', str(tmp_path / 'other'), '--raw_dir', str(save / 'raw'), '--seed', '7'] + SMALL)
    assert 'holds a complete render of other settings (seed 0)' in e.value.code


def test_interrupted_overwrite_keeps_the_previous_set(tmp_path, monkeypatch, capsys):
    save = tmp_path / 'syn'
    _prepare(['--save_dir', str(save)] + SMALL)
    before = read_partitions(str(save / 'partitions.pkl'))
    _interrupt_after(monkeypatch, synthetic, '_render_job', 7)
    with pytest.raises(SystemExit):
        _prepare(['--save_dir', str(save), '--overwrite', '--seed', '5'] + SMALL)
    state, mark = synthetic.render_state(str(save / 'raw'))
    assert state == 'complete' and mark['settings']['seed'] == 0
    assert read_partitions(str(save / 'partitions.pkl')) == before
    assert sorted(os.listdir(save)) == ['images', 'partitions.pkl', 'raw']
    # a tree without the mark (a kill mid-move, or older code) is named, not taken for complete
    os.remove(save / 'raw' / synthetic.RENDER_MARK)
    with pytest.raises(SystemExit) as e:
        _prepare(['--save_dir', str(tmp_path / 'new'), '--raw_dir', str(save / 'raw')] + SMALL)
    assert 'holds Market-layout folders without rendered.json, the mark of a complete render' in e.value.code


def _sigint_as_in_a_terminal():
    """In the child before exec: Ctrl-C's default disposition, as a terminal's foreground job has it, even where
    this runner was started in the background with SIGINT ignored (Python keeps an inherited SIG_IGN)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize('delay', [0.5, 0.0, 0.03, 0.06, 0.09])
def test_ctrl_c_of_a_prepare_script_is_one_line(tmp_path, delay):
    """A real SIGINT to synthetic_prepare.py rendering with two worker processes: one line, exit 130, no
    traceback from the script or its workers, nothing left. The short delays aim at the moment the workers are
    forked, where a Ctrl-C was lost (the run went on) or left logging's lock taken (the run hung)."""
    save = tmp_path / 'syn'
    proc = subprocess.Popen([sys.executable, 'data_set/synthetic_prepare.py', '--save_dir', str(save), '--workers',
                             '2', '--num_train_ids', '100', '--num_test_ids', '100', '--im_size', '64', '32'],
                            cwd=str(REPO), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_in_a_terminal)
    try:
        for line in proc.stdout:
            if 'rendering into' in line:
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    assert err.strip() == 'error: ' + prepare_lib.INTERRUPTED
    assert not save.exists() or os.listdir(save) == []


def test_a_ctrl_c_while_loader_workers_fork_comes_after_the_forks():
    # signals.started: the SIGINT that arrives while iter(loader) forks its workers (here: during __iter__) is
    # held until the iterator exists, then raised as a KeyboardInterrupt, as in a terminal (the runner may
    # have been started with SIGINT ignored). Without the deferral it would interrupt the fork's hooks.
    from aligned_reid import signals
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = []

    class Forking:
        def __iter__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)                       # the handler would run here, inside the "fork"
            done.append('forked')
            return iter([1, 2])
    try:
        with pytest.raises(KeyboardInterrupt):
            signals.started(Forking())
        assert done == ['forked']
        assert list(signals.started([3, 4])) == [3, 4]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
