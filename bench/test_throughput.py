"""Throughput of a full test, stage by stage (data loading, feature extraction, each distance
matrix, each re-ranking, the evaluation) on the CPU and on CUDA when present. Re-ranking against a dense
implementation of the published algorithm: bench/evaluation.py --parts re_rank --features clustered.

    python bench/test_throughput.py        # small synthetic set (rendered once), resnet18 128x64
    python bench/test_throughput.py --partitions ~/Dataset/market1501/partitions.pkl \\
        --base_model resnet50 --resize_h_w 256 128 --workers 12 --amp true    # Market-size run
The model is randomly initialised: the work does not depend on the weights."""
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from aligned_reid import cli, data, evaluation
from aligned_reid.model import Model
from aligned_reid.re_ranking import re_ranking, re_ranking_features
from aligned_reid.cli import boolean

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def timed(dev, fn, *a, **kw):
    """(seconds, result) of fn(*a, **kw), waiting for the device's queued work."""
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0, out


def synthetic_set(save_dir, num_test_ids, ims_per_id_cam, workers):
    """Render and prepare the synthetic set once (data_set/synthetic_prepare.py) -> partitions path."""
    path = os.path.join(save_dir, 'partitions.pkl')
    if not os.path.isfile(path):
        cmd = [sys.executable, os.path.join(REPO, 'data_set', 'synthetic_prepare.py'), '--save_dir', save_dir,
               '--num_train_ids', '8', '--num_test_ids', str(num_test_ids), '--ims_per_id_cam',
               str(ims_per_id_cam), '--workers', str(max(1, workers)), '--overwrite']
        print('rendering:', ' '.join(cmd))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return path


def count_batches(loader):
    n = 0
    for images, _ in loader:
        n += len(images)
    return n


def bench_device(device, args, partitions, im_dir, model):
    """All stages on one device; prints one line per stage and returns {stage: seconds}."""
    rows = {}

    def report(stage, seconds, note=''):
        rows[stage] = seconds
        print(f"  {stage:<34s} {seconds:8.2f} s  {note}")

    print(f"\n== {device} ({torch.get_num_threads()} torch threads) ==")
    names, marks = evaluation.test_images(partitions, 'test', args.multi_query)
    transform = data.build_transform(tuple(args.resize_h_w), train=False)
    loader = data.make_test_loader(im_dir, names, marks, transform, batch_size=args.test_batch_size,
                                   workers=args.workers, pin_memory=device.type == 'cuda')
    t, n = timed(device, count_batches, loader)
    report('data loading alone', t, f"{n} images ({len(partitions['test_im_names'])} in the split), "
                                    f"{n / t:.0f} images/s")
    model = model.to(device)
    amp = args.amp and device.type == 'cuda'
    t, feats = timed(device, evaluation.extract_features, model, loader, device, amp=amp, progress=False)
    report('feature extraction (with loading)', t, f"{n / t:.0f} images/s")
    mq = None if args.multi_query == 'none' else args.multi_query
    sel = lambda m: {k: feats[k][feats['marks'] == m] for k in ('global', 'local')}
    qf = ({k: v for k, v in evaluation.pool_multi_query(feats, mq).items() if k in ('global', 'local')}
          if mq else sel(0))
    gf = sel(1)
    ids, cams, mk = feats['ids'], feats['cams'], feats['marks']
    q_ids, q_cams, g_ids, g_cams = ids[mk == 0], cams[mk == 0], ids[mk == 1], cams[mk == 1]
    Q, G = len(q_ids), len(g_ids)
    kw = dict(normalize=args.normalize_feature, device=device)
    for name in args.distances:
        mats = {}
        for pair, (a, b) in (('q x g', (qf, gf)), ('q x q', (qf, qf)), ('g x g', (gf, gf))):
            t, mats[pair] = timed(device, evaluation.compute_dist, a, b, name, **kw)
            report(f'{name} distance {pair}', t, f"{mats[pair].shape[0]} x {mats[pair].shape[1]}")
        t, res = timed(device, evaluation.evaluate_rank, mats['q x g'], q_ids, g_ids, q_cams, g_cams)
        report(f'{name} evaluation (CMC, mAP)', t, f"Rank-1 {100 * res['cmc'][0]:.2f}  mAP {100 * res['mAP']:.2f}")
        t, rr = timed(device, re_ranking, mats['q x g'], mats['q x q'], mats['g x g'], device=device)
        report(f'{name} re-ranking from the matrices', t)
        del mats
        t, rr_f = timed(device, re_ranking_features, qf, gf, name, **kw)
        report(f'{name} re-ranking from features', t,
               f"(all three distances included; max |diff| vs matrices {np.abs(rr_f - rr).max():.1e})")
        t, res = timed(device, evaluation.evaluate_rank, rr_f, q_ids, g_ids, q_cams, g_cams)
        report(f'{name} evaluation after re-ranking', t,
               f"Rank-1 {100 * res['cmc'][0]:.2f}  mAP {100 * res['mAP']:.2f}")
    t, _ = timed(device, evaluation.evaluate, feats, distances=tuple(args.distances), re_rank=True,
                 multi_query=mq, normalize=args.normalize_feature, device=device)
    report('evaluation.evaluate, all of the above', t, f"({Q} queries x {G} gallery)")
    print(f"  whole test (extraction + evaluate) {rows['feature extraction (with loading)'] + t:8.2f} s")
    return rows


def build_parser():
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--partitions', default=None,
                   help='partitions.pkl of a prepared set to test on. Default: a synthetic set rendered '
                        'into --synthetic_dir')
    p.add_argument('--synthetic_dir', default=None,
                   help='where the default synthetic set is rendered once. Default: '
                        '<tmp>/aligned_reid_bench_synthetic_<num_test_ids>_<ims_per_id_cam>')
    p.add_argument('--num_test_ids', type=int, default=50,
                   help='test identities of the rendered synthetic set. Default: 50')
    p.add_argument('--ims_per_id_cam', type=int, default=3,
                   help='images per identity and camera of the rendered synthetic set. Default: 3')
    p.add_argument('--base_model', default='resnet18', choices=('resnet18', 'resnet34', 'resnet50', 'resnet101'),
                   help='backbone. Default: resnet18')
    p.add_argument('--resize_h_w', type=int, nargs=2, default=[128, 64], metavar=('H', 'W'),
                   help='input size. Default: 128 64')
    p.add_argument('--test_batch_size', type=int, default=64, help='extraction batch size. Default: 64')
    p.add_argument('--workers', type=int, default=2, help='data loader workers. Default: 2')
    p.add_argument('--devices', nargs='+', default=None,
                   help="devices to run on, e.g. cpu cuda. Default: cpu, and cuda when available")
    p.add_argument('--distances', nargs='+', default=['global', 'local', 'global_local'],
                   choices=('global', 'local', 'global_local'),
                   help='distances to time. Default: global local global_local')
    p.add_argument('--multi_query', choices=('none', 'avg', 'max'), default='none',
                   help='as test.py; with none the mark-2 images are not loaded. Default: none')
    p.add_argument('--normalize_feature', type=boolean, default=False,
                   help='L2-normalise features before distances. Default: false')
    p.add_argument('--amp', type=boolean, default=False, help='mixed-precision extraction on CUDA. Default: false')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads. Default: torch\'s choice')
    return p


def main(args):
    sys.stdout.reconfigure(line_buffering=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (['cpu'] + (['cuda'] if torch.cuda.is_available() else []))
    for d in devices:
        if d.startswith('cuda') and not torch.cuda.is_available():
            raise SystemExit(f"test_throughput.py: --devices {d}: CUDA is not available here")
    print(f"torch {torch.__version__}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}")
    synthetic_dir = args.synthetic_dir or os.path.join(
        tempfile.gettempdir(), f'aligned_reid_bench_synthetic_{args.num_test_ids}_{args.ims_per_id_cam}')
    path = args.partitions or synthetic_set(synthetic_dir, args.num_test_ids, args.ims_per_id_cam,
                                            args.workers)
    partitions = data.read_partitions(os.path.expanduser(path))
    im_dir = data.partitions_images_dir(os.path.expanduser(path))
    model = Model(base=args.base_model, num_classes=None, pretrained=False)
    print(f"set {path}: {len(partitions['test_im_names'])} test images; {args.base_model} at "
          f"{args.resize_h_w[0]}x{args.resize_h_w[1]}, batch {args.test_batch_size}, {args.workers} workers")
    for d in devices:
        bench_device(torch.device(d), args, partitions, im_dir, model)


if __name__ == '__main__':
    main(build_parser().parse_args())
