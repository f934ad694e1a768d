"""Ablation of AlignedReID's loss terms on the synthetic set: trains and tests global triplet only,
+ local loss (mined on the global or the local distance), mutual learning as the older reproduction ran
it (from one shared start) with its controls (two different starts, weight 0.1, normalised features),
on request the ID-loss rows, several seeds each, and reports mean and spread of Rank-1 / mAP (with and
without re-ranking) as a markdown table and a JSON file (with the commands, commit and machine).

Each run is `script/train.py` / `script/train_ml.py` in a subprocess, so what is measured is exactly
what a user runs. Run: python bench/ablation.py [--preset cpu|gpu]
"""
import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time

from aligned_reid import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Flags common to all settings come from the preset. The mutual-learning rows are the older
# reproduction's reported setting (global loss, global-distance mutual loss only, -gdmlw 1) from one
# shared start (--same_init true: the distance matrices agree at step 0, so the mutual loss starts at 0;
# on a deterministic device the two models then stay equal) and, as controls, from two different
# starts, at weight 0.1, and with normalised features.
ML = ['-glw', '1', '-llw', '0', '-idlw', '0', '-pmlw', '0', '-ldmlw', '0']
NORM = ['--normalize_feature', 'true']
SETTINGS = {
    'global': ('train.py', ['-glw', '1', '-llw', '0', '-idlw', '0']),
    'global+local': ('train.py', ['-glw', '1', '-llw', '1', '-idlw', '0']),
    'global+local-own': ('train.py', ['-glw', '1', '-llw', '1', '-idlw', '0',
                                       '--local_dist_own_hard_sample', 'true']),
    'mutual-shared': ('train_ml.py', ML + ['-gdmlw', '1', '--same_init', 'true']),
    'mutual-different': ('train_ml.py', ML + ['-gdmlw', '1', '--same_init', 'false']),
    'mutual-different-w0.1': ('train_ml.py', ML + ['-gdmlw', '0.1', '--same_init', 'false']),
    'mutual-shared-w0.1': ('train_ml.py', ML + ['-gdmlw', '0.1', '--same_init', 'true']),
    'global-norm': ('train.py', ['-glw', '1', '-llw', '0', '-idlw', '0'] + NORM),
    'global+local-norm': ('train.py', ['-glw', '1', '-llw', '1', '-idlw', '0'] + NORM),
    'mutual-shared-norm': ('train_ml.py', ML + ['-gdmlw', '1', '--same_init', 'true'] + NORM),
    'mutual-different-norm': ('train_ml.py', ML + ['-gdmlw', '1', '--same_init', 'false'] + NORM),
    # ID-loss rows, not in the default list: the ID loss needs about 30 epochs of the cpu preset to train
    # (see PRESETS), more than an ablation of all rows affords on 2 cores.
    'global+id': ('train.py', ['-glw', '1', '-llw', '0', '-idlw', '1']),
    'global+local+id': ('train.py', ['-glw', '1', '-llw', '1', '-idlw', '1']),
    'mutual-all': ('train_ml.py', ['-glw', '1', '-llw', '1', '-idlw', '1', '-pmlw', '1', '-gdmlw', '1', '-ldmlw', '1',
                                   '--local_dist_own_hard_sample', 'true']),
}
DEFAULT_SETTINGS = ('global', 'mutual-shared', 'mutual-different', 'global+local', 'global+local-own',
                    'mutual-different-w0.1', 'global-norm', 'global+local-norm', 'mutual-different-norm')

# cpu: ResNet-18 at 64 x 32 with last stride 1 -> a 4 x 2 feature map, 4 stripes to align, at
# about half the cost of 128 x 64 with stride 2 (the same 4 rows). gpu: the paper's setting,
# ResNet-50 from ImageNet weights at 256 x 128 (8 stripes), P x K = 32 x 4, on the set rendered
# at 256 x 128.
PRESETS = {
    'cpu': {
        'render': ['--im_size', '128', '64', '--workers', '2'],
        'train': ['--base_model', 'resnet18', '--resize_h_w', '64', '32', '--last_stride', '1',
                  '--pretrained', 'false', '--ids_per_batch', '16', '--ims_per_id', '4',
                  '--base_lr', '1e-3', '--lr_decay_type', 'exp', '--workers', '2', '--device', 'cpu'],
        # The ID-loss rows (not default) need --epochs 30 (in make demo's log, with this P x K and lr,
        # the ID training precision is 4% after 10 epochs, 40% after 20 and 90% after 30); the default
        # rows train no classifier and are compared at 12 epochs.
        'epochs': 12, 'decay_at': 9, 'seeds': (1, 2, 3),
    },
    'gpu': {
        'render': ['--im_size', '256', '128', '--workers', '8'],
        'train': ['--base_model', 'resnet50', '--resize_h_w', '256', '128', '--last_stride', '2',
                  '--pretrained', 'true', '--ids_per_batch', '32', '--ims_per_id', '4',
                  '--base_lr', '2e-4', '--lr_decay_type', 'exp', '--workers', '8', '--amp', 'true',
                  '--device', 'cuda'],
        'epochs': 60, 'decay_at': 40, 'seeds': (1, 2, 3),
    },
}

# Result keys of metrics.json shown in the table, per setting.
DISTANCES = (('global', 'global'), ('local', 'local'), ('global_local', 'global + local'))


def build_parser():
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', choices=sorted(PRESETS), default='cpu',
                   help='cpu: ResNet-18, 64 x 32, last stride 1 (4 stripes), about two hours on 2 quiet cores; '
                        'gpu: ResNet-50, 256 x 128 (8 stripes), ImageNet weights, amp. Default: cpu')
    p.add_argument('--settings', nargs='+', choices=sorted(SETTINGS), default=list(DEFAULT_SETTINGS),
                   help='settings to run, in this order. Default: {}'.format(' '.join(DEFAULT_SETTINGS)))
    p.add_argument('--seeds', type=int, nargs='+', default=None,
                   help='training seeds; all settings run for a seed before the next seed starts. '
                        'Default: the preset\'s (1 2 3)')
    p.add_argument('--epochs', type=int, default=None,
                   help='training epochs (P x K sampler: one epoch = num ids / P steps). '
                        'Default: the preset\'s (cpu 12, gpu 60)')
    p.add_argument('--exp_decay_at_epoch', type=int, default=None,
                   help='epoch at which the exponential lr decay starts. Default: the preset\'s (cpu 9, gpu 40)')
    p.add_argument('--data_dir', default=None,
                   help='prepared synthetic set; rendered and prepared there when its partitions.pkl '
                        'is missing, reused otherwise. Default: ~/Dataset/synthetic_ablation_<preset>')
    p.add_argument('--render_seed', type=int, default=0, help='seed of the rendered set. Default: 0')
    p.add_argument('--out_dir', default=None,
                   help='one experiment folder per setting and seed, plus ablation.json and ablation.md. '
                        'Default: exp/ablation/<preset>')
    p.add_argument('--device', default=None, help='--device passed to the training scripts. '
                                                  'Default: the preset\'s (cpu / cuda)')
    p.add_argument('--extra', default='',
                   help='extra flags for every training run, one quoted string (e.g. "--workers 4"). '
                        'Default: none')
    p.add_argument('--rerun', action='store_true',
                   help='train again even when a run folder holds the metrics of the same command. '
                        'Default: reuse them')
    p.add_argument('--report_only', action='store_true',
                   help='train nothing: tabulate the runs of the given settings and seeds that have '
                        'finished (e.g. of an interrupted ablation). Default: train what is missing')
    return p


def run_command(preset, setting, seed, data_dir, exp_dir, epochs, decay_at, device, extra):
    """argv (list of str) of one training run."""
    script, flags = SETTINGS[setting]
    p = PRESETS[preset]
    argv = [sys.executable, os.path.join(ROOT, 'script', script), '--train_dataset', 'synthetic',
            '--train_partitons', os.path.join(data_dir, 'partitions.pkl'), '--exp_dir', exp_dir,
            '--seed', str(seed), '--total_epochs', str(epochs), '--exp_decay_at_epoch', str(decay_at),
            '--final_test', 'true', '--to_re_rank', 'true'] + p['train'] + flags
    if device is not None:
        argv += ['--device', device]  # argparse keeps the last occurrence
    return argv + shlex.split(extra)


def last_epoch_stats(log_path):
    """{name: float} of the last 'epoch N/M ...' line of a train.log (the epoch's mean loss terms,
    distances and precisions), or {} when there is none."""
    if not os.path.isfile(log_path):
        return {}
    line = None
    with open(log_path) as f:
        for ln in f:
            if re.search(r' epoch \d+/\d+ ', ln):
                line = ln
    if line is None:
        return {}
    tail = line.split(' epoch ', 1)[1].split()
    out = {}
    for name, value in zip(tail[1:], tail[2:]):
        if re.fullmatch(r'[A-Za-z][\w]*', name):
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def ensure_data(preset, data_dir, render_seed):
    """Renders and prepares the synthetic set into data_dir unless its partitions.pkl exists."""
    if os.path.isfile(os.path.join(data_dir, 'partitions.pkl')):
        print('reusing the prepared set {}'.format(data_dir), flush=True)
        return
    cmd = [sys.executable, os.path.join(ROOT, 'data_set', 'synthetic_prepare.py'), '--save_dir', data_dir,
           '--seed', str(render_seed), '--overwrite'] + PRESETS[preset]['render']
    print('rendering: {}'.format(' '.join(cmd)), flush=True)
    subprocess.run(cmd, check=True)


def finished(argv, exp_dir):
    """The metrics dict exp_dir holds from a finished run of the same command, else None."""
    cmd_path, metrics_path = os.path.join(exp_dir, 'command.txt'), os.path.join(exp_dir, 'metrics.json')
    if not (os.path.isfile(metrics_path) and os.path.isfile(cmd_path)):
        return None
    with open(cmd_path) as f:
        if f.read().strip() != ' '.join(shlex.quote(a) for a in argv[1:]):
            return None
    with open(metrics_path) as f:
        return json.load(f)


def train(argv, exp_dir, rerun):
    """Runs one training command (output to exp_dir/run.log) unless exp_dir already holds the metrics
    of the same command. Returns (metrics dict, wall seconds or None when reused)."""
    os.makedirs(exp_dir, exist_ok=True)
    cmd_path, metrics_path = os.path.join(exp_dir, 'command.txt'), os.path.join(exp_dir, 'metrics.json')
    # The interpreter path is left out: it may differ between runs of the same ablation.
    cmd = ' '.join(shlex.quote(a) for a in argv[1:])
    done = None if rerun else finished(argv, exp_dir)
    if done is not None:
        return done, None
    for path in (metrics_path, cmd_path):
        if os.path.exists(path):
            os.remove(path)
    t = time.time()
    with open(os.path.join(exp_dir, 'run.log'), 'w') as log:
        r = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.time() - t
    if r.returncode != 0 or not os.path.isfile(metrics_path):
        raise RuntimeError('training failed (exit {}); see {}'.format(r.returncode, os.path.join(exp_dir, 'run.log')))
    with open(cmd_path, 'w') as f:
        f.write(cmd + '\n')
    with open(metrics_path) as f:
        return json.load(f), wall


def spread(values):
    """{'mean', 'sd' (sample, 0 for one value), 'min', 'max', 'n'} of a list of floats."""
    return {'mean': statistics.fmean(values), 'sd': statistics.stdev(values) if len(values) > 1 else 0.,
            'min': min(values), 'max': max(values), 'n': len(values)}


def summarize(runs):
    """runs: {setting: [run dict]} -> list of table rows {setting, model, distance, metric: spread}.
    A mutual-learning run contributes a row per model."""
    rows = []
    for setting, rs in runs.items():
        models = [('results', '')] + ([('results_model2', ' (model 2)')] if any('results_model2' in r['metrics'] for r in rs) else [])
        for key, suffix in models:
            for dist, label in DISTANCES:
                present = [r['metrics'][key] for r in rs if dist in r['metrics'].get(key, {})]
                if not present:
                    continue
                row = {'setting': setting + suffix, 'distance': label}
                for metric in ('rank1', 'mAP'):
                    row[metric] = spread([100. * m[dist][metric] for m in present])
                    if dist + '+re_rank' in present[0]:
                        row[metric + '_rr'] = spread([100. * m[dist + '+re_rank'][metric] for m in present])
                rows.append(row)
    return rows


def format_table(rows):
    """Markdown table: mean +- sample standard deviation [min - max] over the seeds."""
    def cell(s):
        if s is None:
            return '-'
        return '{:.2f} +- {:.2f} [{:.2f}-{:.2f}]'.format(s['mean'], s['sd'], s['min'], s['max'])
    lines = ['| setting | test distance | seeds | Rank-1 (%) | mAP (%) | Rank-1 (%) re-ranked | mAP (%) re-ranked |',
             '| --- | --- | :---: | :---: | :---: | :---: | :---: |']
    for r in rows:
        lines.append('| {} | {} | {} | {} | {} | {} | {} |'.format(
            r['setting'], r['distance'], r['rank1']['n'], cell(r['rank1']), cell(r['mAP']),
            cell(r.get('rank1_rr')), cell(r.get('mAP_rr'))))
    return '\n'.join(lines)


def machine():
    """What the figures were measured on: CPU model and count, torch threads (the training scripts
    inherit OMP_NUM_THREADS), niceness, versions, GPU."""
    import torch
    cpu = platform.processor() or platform.machine()
    if os.path.isfile('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            names = [ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')]
        cpu = names[0] if names else cpu
    return {'platform': platform.platform(), 'cpu': cpu, 'cpu_count': os.cpu_count(),
            'torch_threads': torch.get_num_threads(), 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS'),
            'nice': os.nice(0) if hasattr(os, 'nice') else None, 'python': platform.python_version(),
            'torch': torch.__version__, 'cuda': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def commit():
    """The checked-out commit of this repository, '+dirty' when tracked files differ from it; None
    outside a git checkout."""
    try:
        head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ('+dirty' if dirty.stdout.strip() else '')


def main(args):
    p = PRESETS[args.preset]
    seeds = args.seeds or list(p['seeds'])
    epochs = args.epochs or p['epochs']
    decay_at = args.exp_decay_at_epoch or p['decay_at']
    data_dir = os.path.abspath(os.path.expanduser(
        args.data_dir or os.path.join('~', 'Dataset', 'synthetic_ablation_' + args.preset)))
    out_dir = os.path.abspath(args.out_dir or os.path.join('exp', 'ablation', args.preset))
    os.makedirs(out_dir, exist_ok=True)
    if not args.report_only:
        ensure_data(args.preset, data_dir, args.render_seed)

    report = {'preset': args.preset, 'command': ' '.join(shlex.quote(a) for a in sys.argv),
              'commit': commit(), 'machine': machine(), 'data_dir': data_dir, 'render_seed': args.render_seed,
              'epochs': epochs, 'exp_decay_at_epoch': decay_at, 'seeds': seeds, 'runs': {}}
    if args.report_only:
        report['report_only'] = 'tabulated from finished runs; machine is the tabulating one'
    runs = {s: [] for s in args.settings}
    table = format_table([])
    t0 = time.time()
    for seed in seeds:
        for setting in args.settings:
            exp_dir = os.path.join(out_dir, setting, 'seed{}'.format(seed))
            argv = run_command(args.preset, setting, seed, data_dir, exp_dir, epochs, decay_at, args.device, args.extra)
            if args.report_only:
                metrics, wall = finished(argv, exp_dir), None
                if metrics is None:
                    print('{} seed {}: not finished, left out'.format(setting, seed), flush=True)
                    continue
            else:
                print('[{:6.0f} s] {} seed {}: {}'.format(time.time() - t0, setting, seed, ' '.join(argv[1:])),
                      flush=True)
                metrics, wall = train(argv, exp_dir, args.rerun)
            r = {'seed': seed, 'wall_s': wall, 'exp_dir': exp_dir, 'command': argv[1:],
                 'last_epoch': last_epoch_stats(os.path.join(exp_dir, 'train.log')), 'metrics': {
                     k: {d: {m: v[m] for m in ('rank1', 'mAP', 'rank5', 'mINP') if m in v} for d, v in metrics[k].items()}
                     for k in ('results', 'results_model2') if k in metrics}}
            runs[setting].append(r)
            g = r['metrics']['results']['global']
            print('    {} global Rank-1 {:.2%} mAP {:.2%} ({})'.format(
                setting, g['rank1'], g['mAP'], 'reused' if wall is None else '{:.0f} s'.format(wall)), flush=True)
            # Written after every run, so an interrupted ablation keeps what finished.
            report['runs'] = runs
            report['table'] = summarize({s: rs for s, rs in runs.items() if rs})
            with open(os.path.join(out_dir, 'ablation.json'), 'w') as f:
                json.dump(report, f, indent=1)
            table = format_table(report['table'])
            with open(os.path.join(out_dir, 'ablation.md'), 'w') as f:
                f.write(table + '\n')
    print('\n{} preset, {} epochs, seeds {}, {:.0f} s in all; mean +- sd [min-max] over the seeds:\n{}'.format(
        args.preset, epochs, ' '.join(map(str, seeds)), time.time() - t0, table))
    return report


if __name__ == '__main__':
    main(build_parser().parse_args())
