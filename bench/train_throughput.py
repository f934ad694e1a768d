"""Benchmark: the real training loop (a prepared partitions file, the real input pipelines, Model,
compute_losses, Adam, aligned_reid.engine.train_one_epoch) against the bare backbone forward + backward +
Adam step on a fixed batch, in the same process; fp32 and, on CUDA, --amp (bf16 autocast, channels-last).
Prints images/s of each, their ratio, the share of the step time spent waiting for data and the
first-batch latency of an epoch.

CPU (small, anyone can run it; renders and prepares a synthetic set under --data_dir once):
    python bench/train_throughput.py
GPU (the paper's setting):
    python bench/train_throughput.py --device cuda --base_model resnet50 --resize_h_w 256 128 \
        --ids_per_batch 32 --ims_per_id 4 --workers 12 --render_size 256 128
"""
import argparse
import os
import time

import torch

from aligned_reid import cli, data, engine
from aligned_reid.augment import Augment
from aligned_reid.loss import compute_losses
from aligned_reid.model import Model
from aligned_reid.prepare import prepare_market_layout
from aligned_reid.synthetic import render_market_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prepared_set(args):
    path = os.path.join(args.data_dir, 'prepared', 'partitions.pkl')
    if not os.path.isfile(path):
        raw = os.path.join(args.data_dir, 'raw')
        render_market_tree(raw, num_train_ids=args.num_ids, num_test_ids=10, ims_per_id_cam=4, num_cams=6,
                           im_size=tuple(args.render_size), seed=0, workers=os.cpu_count())
        prepare_market_layout(raw, os.path.dirname(path), dataset='synthetic', num_val_ids=2, verbose=False)
    return path


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def bare_images_per_s(args, device, amp_dtype, steps):
    """Backbone forward + backward + Adam on one fixed batch: the ceiling of a training step."""
    torch.manual_seed(0)
    model = Model(args.base_model, last_stride=args.last_stride).to(device).train()
    if amp_dtype is not None:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.base.parameters(), lr=1e-4)
    batch = args.ids_per_batch * args.ims_per_id
    images = torch.randn(batch, 3, *args.resize_h_w, device=device)
    if amp_dtype is not None:
        images = images.contiguous(memory_format=torch.channels_last)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model.base(images).float().mean()
        out.backward()
        opt.step()
    for _ in range(3):
        step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch / (time.perf_counter() - t0)


def loop_figures(args, device, amp_dtype, pipeline, partitions_path):
    """images/s over epochs 2.. of the real loop, the data-wait share and the first-batch latency."""
    parts = data.read_partitions(partitions_path)
    names, ids2labels = parts['trainval_im_names'], parts['trainval_ids2labels']
    augment = Augment(tuple(args.resize_h_w), crop_prob=0.5, crop_ratio=0.9, random_erasing=0.5, seed=0)
    _, store = data.choose_train_pipeline(pipeline, device, len(names), args.resize_h_w)
    t0 = time.perf_counter()
    loader = data.make_train_loader(data.partitions_images_dir(partitions_path), names, ids2labels,
                                    args.ids_per_batch, args.ims_per_id, augment, workers=args.workers, seed=0,
                                    device=device, pipeline=pipeline, store=store)
    set_up = time.perf_counter() - t0
    torch.manual_seed(0)
    model = Model(args.base_model, last_stride=args.last_stride, num_classes=len(ids2labels)).to(device)
    if amp_dtype is not None:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=5e-4)
    losses = dict(global_margin=0.3, local_margin=0.3, global_loss_weight=1., local_loss_weight=1.,
                  id_loss_weight=1., normalize_feature=False, local_dist_own_hard_sample=False,
                  label_smoothing=0., check_batch=False)
    images = seconds = 0.
    waits, firsts = [], []
    for epoch in range(1, args.epochs + 1):
        stats, n, _, _, secs = engine.train_one_epoch(
            [model], loader, [opt], [None], device, epoch, lambda outputs, labels: [compute_losses(outputs[0], labels, **losses)],
            amp_dtype=amp_dtype, channels_last=amp_dtype is not None, progress=False)
        if epoch > 1:   # the first epoch warms up workers, allocator and cuDNN
            images, seconds = images + n, seconds + secs
            waits.append(stats['data_wait'])
            firsts.append(stats['first_batch_s'])
    return images / seconds, sum(waits) / len(waits), max(firsts), set_up, len(loader)


def main(args):
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    partitions_path = prepared_set(args)
    amps = [None] + ([torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16]
                     if device.type == 'cuda' else [])
    batch = args.ids_per_batch * args.ims_per_id
    print('{} {} at {} x {}, batch {} x {} = {}, {} workers, {} epochs (the first is warm-up)'.format(
        device, args.base_model, *args.resize_h_w, args.ids_per_batch, args.ims_per_id, batch, args.workers,
        args.epochs))
    print('{:6s} {:8s} {:>12s} {:>12s} {:>6s} {:>10s} {:>12s} {:>10s}'.format(
        'amp', 'pipeline', 'bare img/s', 'loop img/s', 'ratio', 'data wait', 'first batch', 'set-up'))
    for amp_dtype in amps:
        bare = bare_images_per_s(args, device, amp_dtype, args.bare_steps)
        for pipeline in args.pipelines:
            rate, wait, first, set_up, steps = loop_figures(args, device, amp_dtype, pipeline,
                                                            partitions_path)
            print('{:6s} {:8s} {:12.0f} {:12.0f} {:6.2f} {:9.1f}% {:10.3f} s {:8.1f} s'.format(
                'bf16' if amp_dtype == torch.bfloat16 else 'fp16' if amp_dtype else 'fp32', pipeline, bare, rate,
                rate / bare, 100 * wait, first, set_up))
    print('({} steps per epoch; ratio = real loop / bare backbone images/s)'.format(steps))


def build_parser():
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda'. Default: cpu")
    p.add_argument('--base_model', default='resnet18', help='backbone. Default: resnet18')
    p.add_argument('--last_stride', type=int, default=2, help='last stride. Default: 2')
    p.add_argument('--resize_h_w', type=int, nargs=2, default=[128, 64], help='input size. Default: 128 64')
    p.add_argument('--render_size', type=int, nargs=2, default=[128, 64],
                   help='size the synthetic images are rendered at. Default: 128 64')
    p.add_argument('--num_ids', type=int, default=96, help='training identities rendered. Default: 96')
    p.add_argument('--ids_per_batch', type=int, default=8, help='P. Default: 8')
    p.add_argument('--ims_per_id', type=int, default=4, help='K. Default: 4')
    p.add_argument('--workers', type=int, default=2, help='loader workers. Default: 2')
    p.add_argument('--epochs', type=int, default=3, help='epochs of the real loop (the first is warm-up). Default: 3')
    p.add_argument('--bare_steps', type=int, default=20, help='timed steps of the bare backbone. Default: 20')
    p.add_argument('--pipelines', nargs='+', choices=('workers', 'memory'), default=['workers', 'memory'],
                   help='input pipelines to time. Default: workers memory')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default). Default: 0')
    p.add_argument('--data_dir', default=os.path.join(REPO, 'bench_out', 'train_throughput'),
                   help='where the synthetic set is rendered and prepared once. Default: bench_out/train_throughput')
    return p


if __name__ == '__main__':
    main(build_parser().parse_args())
