"""Tests of bench/ablation.py's bookkeeping: the training commands it builds (parsed by the real
scripts' parsers), the train.log parsing and the mean / spread table."""
import os
import statistics

import pytest

from aligned_reid.cli import flat_ints
from conftest import load_script

ablation = load_script('bench', 'ablation')


def test_commands_parse_with_the_scripts_parsers(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ablation.ROOT, 'script'))  # train_ml imports train
    parsers = {'train.py': load_script('script', 'train').build_parser(),
               'train_ml.py': load_script('script', 'train_ml').build_parser()}
    for preset in ablation.PRESETS:
        for setting, (script, _) in ablation.SETTINGS.items():
            argv = ablation.run_command(preset, setting, 7, str(tmp_path), str(tmp_path / 'e'), 5, 4,
                                        'cpu', '--workers 0')
            assert argv[1].endswith(script)
            a = parsers[script].parse_args(argv[2:])
            assert (a.seed, a.total_epochs, a.exp_decay_at_epoch, a.device, a.workers) == (7, 5, 4, 'cpu', 0)
            assert a.local_loss_weight == (1. if 'local' in setting or setting == 'mutual-all' else 0.)
            assert a.id_loss_weight == (1. if 'id' in setting.split('+') or setting == 'mutual-all' else 0.)
            if script == 'train_ml.py':
                assert a.global_dist_mutual_loss_weight == (0.1 if 'w0.1' in setting else 1.)
                assert a.same_init == ('shared' in setting) or setting == 'mutual-all'
    cpu = parsers['train.py'].parse_args(ablation.run_command('cpu', 'global', 1, 'd', 'e', 1, 1, None, '')[2:])
    gpu = parsers['train.py'].parse_args(ablation.run_command('gpu', 'global', 1, 'd', 'e', 1, 1, None, '')[2:])
    # The local branch gets at least 4 stripes: 64 / 16 with last stride 1, 256 / 32 with stride 2.
    cpu_size, gpu_size = flat_ints(cpu.resize_h_w), flat_ints(gpu.resize_h_w)   # the parser keeps '(h,w)' groups
    assert cpu_size[0] // (16 if cpu.last_stride == 1 else 32) == 4
    assert (gpu.base_model, gpu_size, gpu_size[0] // 32) == ('resnet50', [256, 128], 8)


def test_last_epoch_stats(tmp_path):
    log = tmp_path / 'train.log'
    assert ablation.last_epoch_stats(str(log)) == {}
    log.write_text('2026-01-01 10:00:00 train set: synthetic trainval, 200 identities\n'
                   '2026-01-01 10:00:05 epoch 1/2  lr 0.001  54.7 images/s  14.0 s  global_loss 1.3189  '
                   'local_loss 0.3048\n'
                   '2026-01-01 10:00:09 epoch 2/2  lr 0.0005  76.7 images/s  10.0 s  global_loss 0.5048  '
                   'm1_local_dist_ap 6.9444  local_prec 0.4544\n'
                   '2026-01-01 10:00:20 test on synthetic\n')
    assert ablation.last_epoch_stats(str(log)) == {
        'lr': 0.0005, 'global_loss': 0.5048, 'm1_local_dist_ap': 6.9444, 'local_prec': 0.4544}


def fake_metrics(r1, mAP, local=True, model2=False):
    dists = ('global', 'local', 'global_local') if local else ('global',)
    res = {}
    for i, d in enumerate(dists):
        res[d] = {'rank1': r1 + i / 100., 'mAP': mAP}
        res[d + '+re_rank'] = {'rank1': r1 + 0.05, 'mAP': mAP + 0.1}
    out = {'results': res}
    if model2:
        out['results_model2'] = {k: {'rank1': v['rank1'] - 0.1, 'mAP': v['mAP']} for k, v in res.items()}
    return {'metrics': out}


def test_summarize_means_and_spread():
    runs = {'global': [fake_metrics(0.5, 0.3, local=False), fake_metrics(0.7, 0.4, local=False),
                       fake_metrics(0.6, 0.2, local=False)],
            'mutual': [fake_metrics(0.8, 0.6, model2=True), fake_metrics(0.9, 0.7, model2=True)]}
    rows = ablation.summarize(runs)
    assert [(r['setting'], r['distance']) for r in rows] == [
        ('global', 'global'), ('mutual', 'global'), ('mutual', 'local'), ('mutual', 'global + local'),
        ('mutual (model 2)', 'global'), ('mutual (model 2)', 'local'), ('mutual (model 2)', 'global + local')]
    g = rows[0]
    assert g['rank1']['mean'] == pytest.approx(60.) and g['rank1']['n'] == 3
    assert g['rank1']['sd'] == pytest.approx(statistics.stdev([50., 70., 60.]))
    assert (g['rank1']['min'], g['rank1']['max']) == (pytest.approx(50.), pytest.approx(70.))
    assert g['mAP_rr']['mean'] == pytest.approx(40.)
    assert rows[2]['rank1']['mean'] == pytest.approx(86.)   # local row: +1 point in fake_metrics
    assert rows[4]['rank1']['mean'] == pytest.approx(75.)   # model 2: -10 points
    one = ablation.summarize({'global': [fake_metrics(0.5, 0.3, local=False)]})[0]
    assert one['rank1']['sd'] == 0.
    table = ablation.format_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert table[2].startswith('| global | global | 3 | 60.00 +- 10.00 [50.00-70.00] |')


def test_report_only_tabulates_finished_runs(tmp_path, capsys):
    """A run folder counts when it holds metrics.json and the same command; others are left out."""
    out = tmp_path / 'exp'
    args = ablation.build_parser().parse_args(
        ['--out_dir', str(out), '--data_dir', str(tmp_path / 'data'), '--seeds', '1', '2',
         '--settings', 'global', '--epochs', '3', '--report_only'])
    for seed, r1 in ((1, 0.5), (2, 0.7)):
        exp = out / 'global' / 'seed{}'.format(seed)
        exp.mkdir(parents=True)
        argv = ablation.run_command('cpu', 'global', seed, str(tmp_path / 'data'), str(exp), 3,
                                    ablation.PRESETS['cpu']['decay_at'], None, '')
        cmd = ' '.join(argv[1:]) if seed == 1 else 'another command'
        (exp / 'command.txt').write_text(cmd + '\n')
        (exp / 'metrics.json').write_text(
            '{"results": {"global": {"rank1": %s, "mAP": 0.4}, "global+re_rank": {"rank1": 0.8, "mAP": 0.6}}}' % r1)
    report = ablation.main(args)
    assert [r['seed'] for r in report['runs']['global']] == [1]
    assert report['table'][0]['rank1']['mean'] == pytest.approx(50.)
    assert 'global seed 2: not finished' in capsys.readouterr().out
    assert (out / 'ablation.md').read_text().count('\n') == 3
    assert not (tmp_path / 'data').exists()  # nothing rendered
