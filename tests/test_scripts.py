"""End-to-end tests of script/train.py, train_ml.py and test.py on the tiny synthetic sets (conftest's world):
the original README's commands verbatim, exact resume, signals, non-finite losses, two-process gloo torchrun,
bad input."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from aligned_reid.loss import compute_losses
from conftest import REPO, TINY, free_port, load_script, parse_error, train_in_process

SCRIPT = REPO / 'script'
# Overrides appended to the README's commands: a CPU-sized model and a set with few identities. The
# default --pretrained true stays: the ImageNet weights come from the torch hub cache of `world`.
SMALL = ' --base_model resnet18 --resize_h_w 64 32 --total_epochs 1 --ids_per_batch 4 --workers 0'

# The original README's commands, exactly as written there (the resume command's missing backslash included).
README_TRAIN = r"""cd AlignedReID/script

python train.py \
--train_dataset market1501 \
--train_partitons /data/DataSet/market1501/partitions.pkl \
--ids_per_batch 32 \
--ims_per_id 4 \
--normalize_feature false \
-gm 0.3 \
-lm 0.3 \
-glw 1 \
-llw 0 \
-idlw 0 \
--base_lr 2e-4 \
--lr_decay_type exp \
--exp_decay_at_epoch 151 \
--total_epochs 300"""

README_RESUME = r"""cd AlignedReID/script

python train.py \
--resume True
--train_dataset market1501 \
--train_partitons /data/DataSet/market1501/partitions.pkl \
--ids_per_batch 32 \
--ims_per_id 4 \
--normalize_feature false \
-gm 0.3 \
-lm 0.3 \
-glw 1 \
-llw 0 \
-idlw 0 \
--base_lr 2e-4 \
--lr_decay_type exp \
--exp_decay_at_epoch 151 \
--total_epochs 300"""

README_TEST = r"""cd AlignedReID/script

python test.py \
--onlytest True \
--to_re_rank True \
--train_dataset market1501 \
--test_dataset market1501 \
--test_partitons /data/DataSet/market1501/partitions.pkl \
"""

README_TEST_CROSS = r"""cd AlignedReID/script

python test.py \
--onlytest True \
--to_re_rank True \
--train_dataset market1501 \
--test_dataset duke \
--test_dataset_partitions /data/DataSet/duke/partitions.pkl"""


train_script = load_script('script', 'train')
test_script = load_script('script', 'test')


def _readme(command, world, append):
    """The README command with its dataset paths pointed at the tiny sets and `append` added to the line
    that ends the python command."""
    text = command.replace('/data/DataSet/market1501/partitions.pkl', world['market'])
    text = text.replace('/data/DataSet/duke/partitions.pkl', world['duke'])
    lines = text.split('\n')
    i = next(j for j in range(len(lines)) if lines[j].startswith('python'))
    while lines[i].endswith('\\') and i + 1 < len(lines) and lines[i + 1].strip():
        i += 1
    lines[i] = lines[i][:-1].rstrip() + append + ' \\' if lines[i].endswith('\\') else lines[i] + append
    return '\n'.join(lines)


def _bash(text, world):
    return subprocess.run(['bash', '-c', text], cwd=str(world['root']), env=world['env'],
                          capture_output=True, text=True, timeout=300)


def _epoch(path):
    return torch.load(str(path), map_location='cpu', weights_only=False)['epoch']


def test_readme_commands_verbatim(world):
    exp = world['exp']
    r = _bash(_readme(README_TRAIN, world, SMALL), world)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _epoch(exp / 'ckpt.pth') == 1
    metrics = json.load(open(exp / 'metrics.json'))['results']
    assert {'global', 'global+re_rank'} <= set(metrics)
    assert 'Rank-1' in r.stdout
    saved = json.load(open(exp / 'args.json'))
    assert saved['ids_per_batch'] == 4 and saved['ims_per_id'] == 4 and saved['base_lr'] == 2e-4
    assert saved['train_partitions'] == world['market'] and saved['normalize_feature'] is False
    assert saved['pretrained'] is True and saved['pretrained_path'] is None

    # As written, the resume command runs `python train.py --resume True` alone (the next line lacks a
    # backslash, so bash then fails on `--train_dataset ...`): it resumes the market1501 run with its saved
    # arguments. More epochs are asked for, since the first run's were all done.
    r = _bash(_readme(README_RESUME.replace('--resume True\n', '--resume True --total_epochs 2\n'), world, ''), world)
    assert 'resumed from' in r.stdout, r.stdout + r.stderr
    assert _epoch(exp / 'ckpt.pth') == 2
    # With the backslash the user meant, every flag is given again.
    fixed = README_RESUME.replace('--resume True\n', '--resume True \\\n')
    r = _bash(_readme(fixed, world, SMALL.replace('--total_epochs 1', '--total_epochs 3')), world)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'resumed from' in r.stdout and _epoch(exp / 'ckpt.pth') == 3

    os.remove(exp / 'metrics.json')
    r = _bash(_readme(README_TEST, world, ' --workers 0'), world)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r'\| test with global distance \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|', r.stdout)
    assert {'global', 'global+re_rank'} <= set(json.load(open(exp / 'metrics.json'))['results'])

    r = _bash(_readme(README_TEST_CROSS, world, ' --workers 0'), world)
    assert r.returncode == 0, r.stdout + r.stderr
    cross = json.load(open(exp / 'metrics_duke.json'))
    assert cross['test_dataset'] == 'duke' and cross['test_partitions'] == world['duke']

    # Testing or resuming a run that trained from ImageNet weights takes every weight from the checkpoint:
    # it works with no cached weights and no network.
    offline = dict(world['env'], TORCH_HOME=str(world['root'] / 'empty_torch_home'))
    r = subprocess.run([sys.executable, str(SCRIPT / 'train.py'), '--onlytest', 'true', '--to_re_rank', 'false',
                        '--exp_dir', str(exp)], cwd=str(world['root']), env=offline,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'Rank-1' in r.stdout
    # A new run that asks for ImageNet weights it cannot get stops with a message naming the way out.
    r = subprocess.run([sys.executable, str(SCRIPT / 'train.py'), '--train_partitons', world['market'],
                        '--base_model', 'resnet18', '--ids_per_batch', '4',
                        '--exp_dir', str(world['root'] / 'offline_run')],
                       cwd=str(world['root']), env=offline, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert '--pretrained_path' in r.stderr and '--pretrained false' in r.stderr and 'Traceback' not in r.stderr
    assert not (world['root'] / 'offline_run' / 'ckpt.pth').exists()


def _weights(path):
    return torch.load(str(path), map_location='cpu', weights_only=False)['model']


@pytest.mark.parametrize('pipeline', ['workers', 'memory'])
def test_resume_is_exact(world, tmp_path, pipeline):
    """On the CPU: a run stopped at an epoch boundary or by SIGTERM mid-epoch and resumed, with other worker
    counts than the uninterrupted run, ends with bit-identical weights and metrics."""
    before = signal.getsignal(signal.SIGTERM)
    common = ['--train_partitons', world['market'], '--to_re_rank', 'false', '-llw', '1', '--crop_prob', '0.5',
              '--crop_ratio', '0.8', '--random_erasing', '0.5', '--train_pipeline', pipeline] + TINY
    workers = lambda n: ['--workers', str(n)]
    straight = train_in_process(common + ['--exp_dir', str(tmp_path / 'a'), '--total_epochs', '2'])
    assert len(straight) == 2 * 2  # 10 identities, 4 per batch: 2 steps per epoch

    # stopped after epoch 1 with two workers, resumed with one
    first = train_in_process(common + ['--exp_dir', str(tmp_path / 'b'), '--total_epochs', '1'] + workers(2))
    rest = train_in_process(common + ['--exp_dir', str(tmp_path / 'b'), '--total_epochs', '2', '--resume', 'true']
                            + workers(1))
    assert first + rest == straight

    # SIGTERM in the middle of epoch 2 with two workers: the step finishes, the checkpoint is saved, the run
    # exits; resumed with one worker
    calls = []

    def signalling(outputs, labels, **kw):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return compute_losses(outputs, labels, **kw)
    with pytest.raises(SystemExit) as stopped:
        train_in_process(common + ['--exp_dir', str(tmp_path / 'c'), '--total_epochs', '2'] + workers(2),
                         compute=signalling)
    assert stopped.value.code == 128 + signal.SIGTERM
    state = torch.load(str(tmp_path / 'c' / 'ckpt.pth'), map_location='cpu', weights_only=False)
    assert (state['epoch'], state['step_in_epoch']) == (1, 1)
    train_in_process(common + ['--exp_dir', str(tmp_path / 'c'), '--resume', 'true'] + workers(1))

    a = _weights(tmp_path / 'a' / 'ckpt.pth')
    for run in ('b', 'c'):
        b = _weights(tmp_path / run / 'ckpt.pth')
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), run
    assert json.load(open(tmp_path / 'a' / 'metrics.json')) == json.load(open(tmp_path / 'b' / 'metrics.json'))
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is removed again
    assert 'input pipeline: ' + ('memory' if pipeline == 'memory' else '0 persistent') in \
        open(tmp_path / 'a' / 'train.log').read()


def test_two_epochs_then_test_script(world, tmp_path):
    exp = tmp_path / 'exp'
    r = subprocess.run([sys.executable, 'script/train.py', '--train_partitons', world['market'], '--exp_dir', str(exp),
                        '--total_epochs', '2', '-llw', '1', '-idlw', '0.5', '--to_re_rank', 'false'] + TINY,
                       cwd=str(REPO), env=world['env'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    log = open(exp / 'train.log').read()
    for term in ('global_loss', 'local_loss', 'id_loss', 'global_prec', 'local_sm', 'global_dist_ap',
                 'local_dist_an', 'images/s', 'lr 0.0002'):
        assert term in log, term
    assert len(re.findall(r'epoch \d/2 ', log)) == 2
    assert set(json.load(open(exp / 'metrics.json'))['results']) == {'global', 'local', 'global_local'}
    assert os.listdir(exp / 'tensorboard')

    r = subprocess.run([sys.executable, 'test.py', '--exp_dir', str(exp), '--test_partitons', world['duke'],
                        '--test_dataset', 'duke', '--test_distance', 'all', '--ap_mode', 'market_official',
                        '--multi_query', 'avg', '--workers', '0', '--to_re_rank', 'false', '--num_vis_queries', '2'],
                       cwd=str(SCRIPT), env=world['env'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.load(open(exp / 'metrics_duke.json'))
    assert set(out['results']) == {'global', 'local', 'global_local'} and out['multi_query'] == 'avg'
    assert 'test with global + local distance' in r.stdout
    assert sorted(os.listdir(exp / 'ranks_duke')) == ['cmc.png', 'query_00000.png', 'query_00001.png']


def test_non_finite_loss_stops_and_keeps_checkpoint(world, tmp_path):
    calls = []

    def poisoned(outputs, labels, **kw):
        result = compute_losses(outputs, labels, **kw)
        calls.append(1)
        if len(calls) == 4:  # epoch 2, step 2
            result['global_loss'] = result['global_loss'] * float('nan')
            result['loss'] = result['global_loss']
        return result
    exp = tmp_path / 'nan'
    with pytest.raises(SystemExit) as e:
        train_in_process(['--train_partitons', world['market'], '--exp_dir', str(exp), '--total_epochs', '3'] + TINY,
                         compute=poisoned)
    assert 'global_loss' in str(e.value.code) and 'epoch 2 step 2' in str(e.value.code)
    assert _epoch(exp / 'ckpt.pth') == 1
    assert 'non-finite loss: global_loss' in open(exp / 'train.log').read()


def test_deterministic_run_on_the_cpu(world, tmp_path):
    from aligned_reid import engine
    seen = []

    def recording(outputs, labels, **kw):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return compute_losses(outputs, labels, **kw)
    try:
        train_in_process(['--train_partitons', world['market'], '--exp_dir', str(tmp_path / 'det'),
                          '--total_epochs', '1', '--deterministic', 'true', '--final_test', 'false'] + TINY,
                         compute=recording)
    finally:
        engine.configure_determinism(False)
    assert seen == [True, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('pipeline', ['workers', 'memory'])
def test_resume_is_exact_on_cuda_with_deterministic(world, tmp_path, pipeline):
    from aligned_reid import engine
    common = ['--train_partitons', world['market'], '--to_re_rank', 'false', '-llw', '1', '--crop_prob', '0.5',
              '--crop_ratio', '0.8', '--random_erasing', '0.5', '--train_pipeline', pipeline,
              '--deterministic', 'true'] + TINY + ['--device', 'cuda', '--workers', '2']
    try:
        straight = train_in_process(common + ['--exp_dir', str(tmp_path / 'a'), '--total_epochs', '2'])
        first = train_in_process(common + ['--exp_dir', str(tmp_path / 'b'), '--total_epochs', '1'])
        rest = train_in_process(common + ['--exp_dir', str(tmp_path / 'b'), '--total_epochs', '2', '--resume',
                                          'true', '--workers', '1'])
    finally:
        engine.configure_determinism(False)
    assert first + rest == straight
    a, b = _weights(tmp_path / 'a' / 'ckpt.pth'), _weights(tmp_path / 'b' / 'ckpt.pth')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_processes_gloo(world, tmp_path):
    exp = tmp_path / 'ddp'
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                        '--master_port={}'.format(free_port()), 'script/train.py', '--train_partitons', world['market'],
                        '--exp_dir', str(exp), '--total_epochs', '1', '--to_re_rank', 'false'] + TINY,
                       cwd=str(REPO), env=dict(world['env'], OMP_NUM_THREADS='1'), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    state = torch.load(str(exp / 'ckpt.pth'), map_location='cpu', weights_only=False)
    assert state['epoch'] == 1 and state['world_size'] == 2 and len(state['rng']) == 2
    log = open(exp / 'train.log').read()
    assert 'on 2 process(es)' in log and log.count('epoch 1/1') == 1  # rank 0 alone writes
    assert os.path.isfile(exp / 'metrics.json')


@pytest.mark.parametrize('argv,message', [
    (['--train_dataset', 'nowhere'], "--train_dataset 'nowhere' is unknown"),
    (['--train_partitons', 'missing/partitions.pkl'], '--train_partitons: partitions file not found'),
    (['--resume', 'maybe'], 'argument --resume: invalid boolean value'),
    (['--normalize_feature', 'sure'], 'argument --normalize_feature: invalid boolean value'),
    (['--base_model', 'vgg16'], 'argument --base_model: invalid choice'),
    (['--lr_decay_type', 'cosine'], 'argument --lr_decay_type: invalid choice'),
])
def test_train_bad_flags(argv, message, capsys):
    assert message in parse_error(train_script, argv, capsys)


def test_train_bad_combinations(world, tmp_path, capsys):
    base = ['--train_partitons', world['market'], '--exp_dir', str(tmp_path / 'none')]
    assert '--ids_per_batch 32 exceeds the 10 identities' in parse_error(train_script, base, capsys)
    assert '--ims_per_id must be at least 2' in parse_error(
        train_script, base + ['--ids_per_batch', '4', '--ims_per_id', '1'], capsys)
    assert '-glw, -llw and -idlw are all 0' in parse_error(
        train_script, base + ['--ids_per_batch', '4', '-glw', '0'], capsys)
    assert '--resume true: no checkpoint at' in parse_error(train_script, base + ['--resume', 'true'], capsys)
    assert '--pretrained_path: file not found' in parse_error(
        train_script, base + ['--ids_per_batch', '4', '--pretrained_path', 'nope.pth'], capsys)
    if not torch.cuda.is_available():
        assert '--device cuda' in parse_error(train_script, base + ['--ids_per_batch', '4', '--device', 'cuda'],
                                              capsys)
    bad = tmp_path / 'bad.pkl'
    bad.write_bytes(b'not a pickle')
    assert '--train_partitons {}'.format(bad) in parse_error(
        train_script, ['--train_partitons', str(bad), '--exp_dir', str(tmp_path / 'none')], capsys)


def test_test_script_bad_input(world, tmp_path, capsys):
    none = str(tmp_path / 'none')
    assert '--exp_dir {}: no trained model there'.format(none) in parse_error(
        test_script, ['--exp_dir', none, '--test_partitons', world['market']], capsys)
    assert 'no trained model for --train_dataset duke' in parse_error(
        test_script, ['--train_dataset', 'duke', '--test_partitons', world['market']], capsys)
    assert '--model_weight_file: file not found' in parse_error(
        test_script, ['--model_weight_file', 'nope.pth', '--test_partitons', world['market']], capsys)
    weights = tmp_path / 'w.pth'
    torch.save({'x': torch.zeros(1)}, str(weights))
    assert '--test_partitons: partitions file not found' in parse_error(
        test_script, ['--model_weight_file', str(weights), '--test_partitons', 'missing.pkl'], capsys)
    assert "--test_dataset 'elsewhere' is unknown" in parse_error(
        test_script, ['--model_weight_file', str(weights), '--test_dataset', 'elsewhere'], capsys)
    assert 'argument --test_distance: invalid choice' in parse_error(test_script, ['--test_distance', 'l1'], capsys)
    args = test_script.parse_args(['--model_weight_file', str(weights), '--test_partitons', world['market'],
                                   '--exp_dir', none, '--base_model', 'resnet18'])
    with pytest.raises(ValueError, match='keys describe no supported backbone'):
        test_script.load_model(args, torch.device('cpu'))


def test_train_ml_one_epoch(world, tmp_path):
    exp = tmp_path / 'ml'
    r = subprocess.run([sys.executable, 'script/train_ml.py', '--train_partitons', world['market'], '--exp_dir', str(exp),
                        '--total_epochs', '1', '-idlw', '1', '-pmlw', '1', '-gdmlw', '1', '--to_re_rank', 'false']
                       + TINY, cwd=str(REPO), env=world['env'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    state = torch.load(str(exp / 'ckpt.pth'), map_location='cpu', weights_only=False)
    assert len(state['models']) == 2 and state['epoch'] == 1
    assert not all(torch.equal(state['models'][0][k], state['models'][1][k]) for k in state['model'])
    log = open(exp / 'train.log').read()
    assert 'm1_prob_mutual_loss' in log and 'm2_global_dist_mutual_loss' in log
    assert set(json.load(open(exp / 'metrics.json'))) >= {'results', 'results_model2'}
    r = subprocess.run([sys.executable, 'script/train_ml.py', '--train_partitons', world['market'], '-pmlw', '1',
                        '--exp_dir', str(tmp_path / 'none')] + TINY, cwd=str(REPO), env=world['env'],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and '-pmlw 1.0 needs the classifier: give -idlw > 0' in r.stderr


def test_help_states_every_default():
    for module in (train_script, test_script):
        for action in module.build_parser()._actions:
            if action.dest != 'help':
                assert 'Default:' in (action.help or ''), (module.__name__, action.dest)


def test_epochs_per_test_tests_each_model_and_keeps_the_best(world, tmp_path, monkeypatch, one_torch_thread):
    # --epochs_per_test through the shared epoch loop: each model is tested on the validation split (training on
    # 'train') as it is at that epoch, each gets its own log line, and the best metric is model 1's best Rank-1.
    from aligned_reid import engine
    train_ml = load_script('script', 'train_ml')
    tested = []
    real = engine.evaluate_model

    def recording(model, partitions, im_dir, split, *a, **kw):
        results, table = real(model, partitions, im_dir, split, *a, **kw)
        tested.append({'split': split, 'state': {k: v.clone() for k, v in model.state_dict().items()},
                       'rank1': float(results['global']['cmc'][0]), 'mAP': float(results['global']['mAP'])})
        return results, table
    monkeypatch.setattr(engine, 'evaluate_model', recording)
    exp = tmp_path / 'ml'
    train_ml.main(train_ml.parse_args(['--train_partitons', world['market'], '--exp_dir', str(exp), '--total_epochs',
                                       '2', '--trainset_part', 'train', '--epochs_per_test', '1', '--final_test',
                                       'false', '-gdmlw', '1'] + TINY))
    assert [t['split'] for t in tested] == ['val'] * 4                        # 2 epochs x 2 models
    state = torch.load(str(exp / 'ckpt.pth'), map_location='cpu', weights_only=False)
    for i in (0, 1):                                                           # the last test saw the saved models
        assert all(torch.equal(tested[2 + i]['state'][k], v) for k, v in state['models'][i].items())
    assert not all(torch.equal(tested[2]['state'][k], tested[3]['state'][k]) for k in tested[2]['state'])
    log = open(exp / 'train.log').read()
    for n, t in enumerate(tested):
        line = 'model {} epoch {} val: Rank-1 {:.2f}%  mAP {:.2f}%'.format(n % 2 + 1, n // 2 + 1, 100 * t['rank1'],
                                                                         100 * t['mAP'])
        assert line in log, (line, log)
    first = max((0, 2), key=lambda n: (tested[n]['rank1'], -n))                # the first epoch with the best
    assert state['best_metric'] == {'rank1': tested[first]['rank1'], 'mAP': tested[first]['mAP'],
                                    'epoch': first // 2 + 1, 'split': 'val'}
    # Training on trainval the periodic test is on the test split: at the last epoch the final test stands for it.
    tested.clear()
    train = load_script('script', 'train')
    train.main(train.parse_args(['--train_partitons', world['market'], '--exp_dir', str(tmp_path / 'one'),
                                 '--total_epochs', '2', '--epochs_per_test', '1', '--to_re_rank', 'false'] + TINY))
    assert [t['split'] for t in tested] == ['test', 'test']                   # epoch 1, then the final test
    assert torch.load(str(tmp_path / 'one' / 'ckpt.pth'), map_location='cpu', weights_only=False)['best_metric'] == {
        'rank1': tested[0]['rank1'], 'mAP': tested[0]['mAP'], 'epoch': 1, 'split': 'test'}
