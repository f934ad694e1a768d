"""Trains AlignedReID (global + aligned local batch-hard triplet loss, optional ID loss) on a prepared
dataset, then tests the final model. One process, or DistributedDataParallel under torchrun."""
import argparse
import json
import math
import os
import signal
import sys
import time
import warnings

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from aligned_reid import data, utils
from aligned_reid.utils import boolean
from aligned_reid.loss import compute_losses
from aligned_reid.model import Model

BASE_MODELS = ('resnet18', 'resnet34', 'resnet50', 'resnet101')
LOSS_TERMS = ('global_loss', 'local_loss', 'id_loss')
# tensorboardX scalar groups of the original: group -> {tag: key in the epoch statistics}
SCALAR_GROUPS = {
    'loss': {'global_loss': 'global_loss', 'local_loss': 'local_loss', 'id_loss': 'id_loss', 'loss': 'loss'},
    'precision': {'global_precision': 'global_prec', 'local_precision': 'local_prec', 'id_precision': 'id_prec'},
    'satisfy_margin': {'global_satisfy_margin': 'global_sm', 'local_satisfy_margin': 'local_sm'},
    'global_dist': {'global_dist_ap': 'global_dist_ap', 'global_dist_an': 'global_dist_an'},
    'local_dist': {'local_dist_ap': 'local_dist_ap', 'local_dist_an': 'local_dist_an'},
    'lr': {'lr': 'lr'},
    'speed': {'images_per_s': 'images_per_s'},
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__)
    d = p.add_argument_group('data')
    d.add_argument('--train_dataset', default='market1501',
                   help='dataset name; sets the default partitions path ~/Dataset/<name>/partitions.pkl and '
                        'experiment folder exp/train/<name> (one of {}; any name when a partitions file is '
                        'given). Default: market1501'.format(', '.join(utils.DATASET_DIRS)))
    d.add_argument('--train_partitons', '--train_partitions', dest='train_partitions', default=None,
                   help='partitions.pkl of the training set (the original spelling and the correct one are '
                        'both accepted). Default: ~/Dataset/<train_dataset>/partitions.pkl')
    d.add_argument('--trainset_part', choices=('trainval', 'train'), default='trainval',
                   help='train on all training ids (trainval) or on train minus the 100 validation ids '
                        '(train; periodic tests then use the validation split). Default: trainval')
    d.add_argument('--ids_per_batch', type=int, default=32, help='P, identities per batch. Default: 32')
    d.add_argument('--ims_per_id', type=int, default=4, help='K, images per identity. Default: 4')
    d.add_argument('--resize_h_w', type=int, nargs=2, default=[256, 128], metavar=('H', 'W'),
                   help='input height and width. Default: 256 128')
    d.add_argument('--crop_prob', type=float, default=0., help='probability of a random crop. Default: 0')
    d.add_argument('--crop_ratio', type=float, default=1., help='side ratio of the random crop. Default: 1')
    d.add_argument('--random_erasing', type=float, default=0.,
                   help='probability of random erasing. Default: 0')
    d.add_argument('--workers', type=int, default=4, help='data loader worker processes. Default: 4')

    m = p.add_argument_group('model')
    m.add_argument('--base_model', choices=BASE_MODELS, default='resnet50', help='backbone. Default: resnet50')
    m.add_argument('--last_stride', type=int, choices=(1, 2), default=2,
                   help='stride of the last ResNet stage. Default: 2')
    m.add_argument('--local_conv_out_channels', type=int, default=128,
                   help='channels of each local stripe feature. Default: 128')
    m.add_argument('--pretrained', type=boolean, default=True,
                   help='start from torchvision ImageNet weights (true/false; needs them downloaded or cached). '
                        'Default: true')
    m.add_argument('--pretrained_path', default=None,
                   help='load backbone weights from this file instead of downloading. Default: none')

    l = p.add_argument_group('loss')
    l.add_argument('--normalize_feature', type=boolean, default=False,
                   help='L2-normalise features (global per vector, local per stripe) for the losses and the test '
                        'distances (true/false). Default: false')
    l.add_argument('-gm', '--global_margin', type=float, default=0.3, help='global triplet margin. Default: 0.3')
    l.add_argument('-lm', '--local_margin', type=float, default=0.3, help='local triplet margin. Default: 0.3')
    l.add_argument('-glw', '--global_loss_weight', type=float, default=1., help='global loss weight. Default: 1')
    l.add_argument('-llw', '--local_loss_weight', type=float, default=0., help='local loss weight. Default: 0')
    l.add_argument('-idlw', '--id_loss_weight', type=float, default=0.,
                   help='identity (softmax) loss weight. Default: 0')
    l.add_argument('--local_dist_own_hard_sample', type=boolean, default=False,
                   help='mine local-loss triplets on the local distance instead of the global one. Default: false')
    l.add_argument('--label_smoothing', type=float, default=0., help='label smoothing of the ID loss. Default: 0')

    o = p.add_argument_group('optimisation')
    o.add_argument('--base_lr', type=float, default=2e-4, help='Adam learning rate. Default: 2e-4')
    o.add_argument('--weight_decay', type=float, default=5e-4, help='Adam weight decay. Default: 5e-4')
    o.add_argument('--lr_decay_type', choices=('exp', 'staircase'), default='exp',
                   help='learning-rate schedule, set at the start of each (1-based) epoch. Default: exp')
    o.add_argument('--exp_decay_at_epoch', type=int, default=151,
                   help='exp: the epoch at which exponential decay to 1e-3 x base_lr begins. Default: 151')
    o.add_argument('--staircase_decay_at_epochs', type=int, nargs='+', default=[101, 201],
                   help='staircase: epochs at which the rate is multiplied by the factor. Default: 101 201')
    o.add_argument('--staircase_decay_multiply_factor', type=float, default=0.1,
                   help='staircase: the factor. Default: 0.1')
    o.add_argument('--total_epochs', type=int, default=300, help='epochs to train. Default: 300')
    o.add_argument('--amp', type=boolean, nargs='?', const=True, default=False,
                   help='mixed precision on CUDA (bfloat16 autocast where supported, else float16 with a '
                        'gradient scaler) and channels-last; ignored with a warning on the CPU. Default: false')

    r = p.add_argument_group('run')
    r.add_argument('--resume', type=boolean, default=False,
                   help='continue from the checkpoint in the experiment folder (true/false), with the saved '
                        'arguments of that run for every flag not given on the command line. Default: false')
    r.add_argument('--onlytest', '--only_test', dest='onlytest', type=boolean, default=False,
                   help='skip training: test the checkpoint in the experiment folder (saved arguments as with '
                        '--resume). Default: false')
    r.add_argument('--exp_dir', default=None,
                   help='experiment folder (checkpoint, log, tensorboard, args, metrics). '
                        'Default: exp/train/<train_dataset> under the current folder')
    r.add_argument('--seed', type=int, default=1, help='random seed. Default: 1')
    r.add_argument('--device', default=None,
                   help="'cpu', 'cuda' or 'cuda:N'. Default: cuda when available, else cpu")
    r.add_argument('--epochs_per_test', type=int, default=0,
                   help='test (global distance, no re-ranking) every N epochs during training and log Rank-1 '
                        'and mAP; 0 tests only at the end. Default: 0')
    r.add_argument('--test_batch_size', type=int, default=64, help='batch size of feature extraction. Default: 64')
    r.add_argument('--final_test', type=boolean, default=True,
                   help='test the final model on the test split after training (true/false). Default: true')
    r.add_argument('--to_re_rank', type=boolean, default=True,
                   help='the final test also reports re-ranked results (true/false). Default: true')
    r.add_argument('--ap_mode', choices=('standard', 'market_official'), default='standard',
                   help='AP formula of the tests. Default: standard')
    r.add_argument('--steps_per_log', type=int, default=0,
                   help='also log running statistics every N steps; 0 logs per epoch only. Default: 0')
    utils.accept_negative_numbers(p)
    return p


def resolve_paths(args):
    """Fills the partitions path and the experiment folder from --train_dataset where not given."""
    if args.train_partitions is None:
        args.train_partitions = utils.default_partitions_path(args.train_dataset)
    args.train_partitions = os.path.expanduser(args.train_partitions)
    if args.exp_dir is None:
        args.exp_dir = utils.default_exp_dir(args.train_dataset)
    args.exp_dir = os.path.abspath(os.path.expanduser(args.exp_dir))
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return args


# Flags that describe this machine or this invocation, never taken from a resumed run's saved arguments.
NOT_RESTORED = ('resume', 'onlytest', 'exp_dir', 'device', 'workers')


def explicit_dests(argv, builder=None):
    """The argument names given on the command line `argv` (a parser whose defaults are all suppressed
    keeps only those). `builder`: the function building the script's parser (default: this one's)."""
    quiet = (builder or build_parser)()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_known_args(argv)[0]))


def restore_saved_args(parser, args, explicit):
    """--resume / --onlytest: every flag not given on the command line takes the value saved by the run
    in the experiment folder, so `python train.py --resume true` continues that run as it was set up."""
    flag = '--resume' if args.resume else '--onlytest'
    exp_dir = os.path.abspath(os.path.expanduser(args.exp_dir or utils.default_exp_dir(args.train_dataset)))
    ckpt = os.path.join(exp_dir, 'ckpt.pth')
    if not os.path.isfile(ckpt):
        parser.error('{} true: no checkpoint at {} (train first, or point --exp_dir / --train_dataset at '
                     'the run)'.format(flag, ckpt))
    saved_path = os.path.join(exp_dir, 'args.json')
    try:
        with open(saved_path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = dict(utils.load_checkpoint(ckpt).get('args') or {})
    for k, v in saved.items():
        if k in NOT_RESTORED or k in explicit or not hasattr(args, k):
            continue
        setattr(args, k, v)
    args.exp_dir = exp_dir
    return args


def check_args(parser, args, explicit=()):
    """Stops at once, naming the flag, on combinations that cannot run. Returns args with paths filled.
    `explicit`: names given on the command line (they win over a resumed run's saved arguments)."""
    if args.resume or args.onlytest:
        restore_saved_args(parser, args, explicit)
    if args.train_partitions is None and args.train_dataset not in utils.DATASET_DIRS:
        parser.error('--train_dataset {!r} is unknown: choose one of {} or give --train_partitons'.format(
            args.train_dataset, ', '.join(utils.DATASET_DIRS)))
    resolve_paths(args)
    for flag in ('ids_per_batch', 'ims_per_id', 'total_epochs', 'exp_decay_at_epoch', 'test_batch_size'):
        if getattr(args, flag) < 1:
            parser.error('--{} must be at least 1, got {}'.format(flag, getattr(args, flag)))
    if args.ids_per_batch < 2:
        parser.error('--ids_per_batch must be at least 2: hard mining needs another identity in the batch '
                     'for the negatives, got {}'.format(args.ids_per_batch))
    if args.ims_per_id < 2:
        parser.error('--ims_per_id must be at least 2 so that every anchor has a positive, got {}'.format(
            args.ims_per_id))
    if min(args.resize_h_w) < 16:
        parser.error('--resize_h_w must be at least 16 16, got {} {}'.format(*args.resize_h_w))
    if args.local_conv_out_channels < 1:
        parser.error('--local_conv_out_channels must be at least 1, got {}'.format(args.local_conv_out_channels))
    if args.label_smoothing >= 1:
        parser.error('--label_smoothing must lie in [0, 1), got {}'.format(args.label_smoothing))
    if args.staircase_decay_multiply_factor <= 0:
        parser.error('--staircase_decay_multiply_factor must be positive, got {}'.format(
            args.staircase_decay_multiply_factor))
    for flag in ('workers', 'epochs_per_test', 'steps_per_log', 'base_lr', 'weight_decay', 'global_margin',
                 'local_margin', 'global_loss_weight', 'local_loss_weight', 'id_loss_weight', 'label_smoothing'):
        if getattr(args, flag) < 0:
            parser.error('--{} must not be negative, got {}'.format(flag, getattr(args, flag)))
    if args.global_loss_weight == 0 and args.local_loss_weight == 0 and args.id_loss_weight == 0:
        parser.error('-glw, -llw and -idlw are all 0: nothing to train')
    if not 0 <= args.crop_prob <= 1 or not 0 <= args.random_erasing <= 1:
        parser.error('--crop_prob and --random_erasing must lie in [0, 1]')
    if not 0 < args.crop_ratio <= 1:
        parser.error('--crop_ratio must lie in (0, 1], got {}'.format(args.crop_ratio))
    if args.pretrained_path is not None and not os.path.isfile(args.pretrained_path):
        parser.error('--pretrained_path: file not found: {}'.format(args.pretrained_path))
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error('--device {}: CUDA is not available on this machine'.format(args.device))
    if not (args.device == 'cpu' or args.device.startswith('cuda')):
        parser.error("--device must be 'cpu', 'cuda' or 'cuda:N', got {!r}".format(args.device))
    if not os.path.isfile(args.train_partitions):
        parser.error('--train_partitons: partitions file not found: {} (prepare the dataset with '
                     'data_set/<name>_prepare.py, or pass the path)'.format(args.train_partitions))
    try:
        parts = data.read_partitions(args.train_partitions)
    except (ValueError, OSError) as e:
        parser.error('--train_partitons {}: {}'.format(args.train_partitions, e))
    key = args.trainset_part + '_ids2labels'
    if key not in parts:
        parser.error('--trainset_part {}: {} has no {!r} (a combined set holds trainval only)'.format(
            args.trainset_part, args.train_partitions, key))
    periodic = 'val' if args.trainset_part == 'train' else 'test'
    if args.epochs_per_test and periodic + '_im_names' not in parts:
        parser.error('--epochs_per_test {}: {} has no {} split to test on (a combined set, or prepared with '
                     '--num_val_ids 0?); use --epochs_per_test 0'.format(args.epochs_per_test, args.train_partitions,
                                                                        periodic))
    num_ids = len(parts[key])
    if args.ids_per_batch > num_ids:
        parser.error('--ids_per_batch {} exceeds the {} identities of the {} set in {}'.format(
            args.ids_per_batch, num_ids, args.trainset_part, args.train_partitions))
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if args.ids_per_batch % world:
        parser.error('--ids_per_batch {} must be divisible by the number of processes ({})'.format(
            args.ids_per_batch, world))
    if args.ids_per_batch // world < 2:
        parser.error('--ids_per_batch {} over {} processes leaves {} identity per process; hard mining needs '
                     'at least 2 per process'.format(args.ids_per_batch, world, args.ids_per_batch // world))
    problem = utils.writable_folder_problem(args.exp_dir)
    if problem:
        parser.error('--exp_dir: {}; give another --exp_dir'.format(problem))
    return args


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    return check_args(parser, parser.parse_args(argv), explicit_dests(argv))


# ----------------------------------------------------------------------------- pieces of main

class NonFiniteLoss(RuntimeError):
    pass


class StopFlag:
    """Set by SIGINT / SIGTERM: the loop finishes the current step, saves and exits."""

    def __init__(self):
        self.requested = False
        self.signum = None

    def __call__(self, signum, frame):
        if self.requested:  # a second signal: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested, self.signum = True, signum

    def install(self):
        self.previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}

    def uninstall(self):
        for s, handler in getattr(self, 'previous', {}).items():
            signal.signal(s, handler)


def amp_settings(amp, device, logger):
    """(autocast dtype or None, GradScaler or None) for --amp on `device`."""
    if not amp:
        return None, None
    if device.type != 'cuda':
        warnings.warn('--amp has no effect on the CPU; training in float32')
        logger.warning('--amp ignored on the CPU')
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler('cuda')


def loss_kwargs(args):
    return dict(global_margin=args.global_margin, local_margin=args.local_margin,
                global_loss_weight=args.global_loss_weight, local_loss_weight=args.local_loss_weight,
                id_loss_weight=args.id_loss_weight, normalize_feature=args.normalize_feature,
                local_dist_own_hard_sample=args.local_dist_own_hard_sample, label_smoothing=args.label_smoothing)


def _remaining_batches(loader, start_step):
    """The same epoch's loader, minus its first `start_step` batches (resuming mid-epoch)."""
    if start_step == 0:
        return loader
    batches = list(loader.batch_sampler)[start_step:]
    return torch.utils.data.DataLoader(loader.dataset, batch_sampler=batches, num_workers=loader.num_workers,
                                       pin_memory=loader.pin_memory, generator=loader.generator)


def _scalar(v):
    return float(v.detach()) if torch.is_tensor(v) else float(v)


def _sync_flags(nonfinite, stop, device):
    """Any rank's non-finite loss or stop request, seen by all ranks (one all_reduce per step)."""
    if not utils.is_dist():
        return nonfinite, stop
    t = torch.tensor([float(nonfinite), float(stop)], device=device)
    torch.distributed.all_reduce(t)
    return bool(t[0].item()), bool(t[1].item())


def train_one_epoch(model, loader, optimizer, scaler, device, epoch, losses, amp_dtype=None, start_step=0,
                    stop=None, channels_last=False, logger=None, steps_per_log=0, compute=None):
    """One pass over the P x K loader. Returns (mean statistics, images seen on all ranks, steps done,
    stopped early). Raises NonFiniteLoss naming the term, epoch and step before any update with it."""
    compute = compute or compute_losses
    model.train()
    sums, n_steps, n_images = {}, 0, 0
    world = utils.get_world_size()
    total = len(loader)
    bar = tqdm(_remaining_batches(loader, start_step), total=total, initial=start_step,
               desc='epoch {}'.format(epoch), disable=not utils.is_main(), leave=False, dynamic_ncols=True)
    stopped, step = False, start_step
    for step, (images, labels) in enumerate(bar, start=start_step + 1):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(images)
        outputs = {k: v.float() for k, v in outputs.items()}
        result = compute(outputs, labels, **losses)
        terms = {k: _scalar(result[k]) for k in ('loss',) + LOSS_TERMS if k in result}
        bad = [k for k in LOSS_TERMS + ('loss',) if k in terms and not math.isfinite(terms[k])]
        any_bad, stop_now = _sync_flags(bool(bad), stop is not None and stop.requested, device)
        if any_bad:
            what = '{} = {}'.format(bad[0], terms[bad[0]]) if bad else 'a loss term on another rank'
            raise NonFiniteLoss('non-finite loss: {} at epoch {} step {}/{}'.format(what, epoch, step, total))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(result['loss']).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            result['loss'].backward()
            optimizer.step()
        for k, v in result.items():
            if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1):
                sums[k] = sums.get(k, 0.) + _scalar(v)
        n_steps += 1
        n_images += images.shape[0] * world
        if utils.is_main():
            bar.set_postfix(loss='{:.4f}'.format(terms['loss']))
        if steps_per_log and step % steps_per_log == 0 and logger is not None:
            logger.info('epoch %d step %d/%d  %s', epoch, step, total,
                        '  '.join('{} {:.4f}'.format(k, v / n_steps) for k, v in sorted(sums.items())))
        if stop_now:
            stopped = True
            break
    bar.close()
    means = {k: v / max(n_steps, 1) for k, v in sums.items()}
    return utils.reduce_mean_scalars(means), n_images, step, stopped


def evaluate(model, partitions, im_dir, split, args, device, distances=('global',), re_rank=False, amp=False):
    """Extracts features of `split` ('test' or 'val') with the bare model and evaluates them.
    Returns (results dict from aligned_reid.evaluation.evaluate, printable table)."""
    from aligned_reid import evaluation
    transform = data.build_transform(tuple(args.resize_h_w), train=False)
    loader = data.make_test_loader(im_dir, partitions[split + '_im_names'], partitions[split + '_marks'],
                                   transform, batch_size=args.test_batch_size, workers=args.workers,
                                   pin_memory=device.type == 'cuda')
    feats = evaluation.extract_features(model, loader, device, amp=amp)
    results = evaluation.evaluate(feats, distances=distances, re_rank=re_rank, ap_mode=args.ap_mode,
                                  normalize=args.normalize_feature)
    return results, evaluation.format_table(results)


def test_distances(local_loss_weight):
    return ('global', 'local', 'global_local') if local_loss_weight > 0 else ('global',)


def final_test(model, partitions, im_dir, args, device, logger, amp=False, write=True, label=''):
    """Tests the final model on the test split (global distance, plus local and global+local when the local
    loss was trained; re-ranked too with --to_re_rank) and writes metrics.json. Rank 0 only."""
    if 'test_im_names' not in partitions:
        logger.info('%s has no test split; skipping the final test', args.train_partitions)
        return None
    results, table = evaluate(model, partitions, im_dir, 'test', args, device,
                              distances=test_distances(args.local_loss_weight), re_rank=args.to_re_rank, amp=amp)
    logger.info('%stest on %s (%s):\n%s', label, args.train_dataset, args.train_partitions, table)
    if write:
        utils.write_json({'train_dataset': args.train_dataset, 'test_dataset': args.train_dataset,
                          'test_partitions': args.train_partitions, 'ap_mode': args.ap_mode,
                          'results': utils.metrics_summary(results)}, os.path.join(args.exp_dir, 'metrics.json'))
    return results


def make_writer(exp_dir):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # logging still goes to stdout and the log file
        return None
    return SummaryWriter(log_dir=os.path.join(exp_dir, 'tensorboard'))


def write_scalars(writer, stats, epoch):
    if writer is None:
        return
    for group, tags in SCALAR_GROUPS.items():
        values = {tag: stats[key] for tag, key in tags.items() if key in stats}
        if values:
            writer.add_scalars(group, values, epoch)
    writer.flush()


def shutdown(stop, writer):
    """Restores the signal handlers, closes the tensorboard writer and leaves the process group."""
    stop.uninstall()
    if writer is not None:
        writer.close()
    utils.cleanup_distributed()


def bare(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def save(path, model, optimizer, scaler, epoch, step_in_epoch, best, args):
    """Gathers every rank's RNG state, then rank 0 writes the checkpoint atomically."""
    rng = utils.all_gather_object(utils.get_rng_state())
    if utils.is_main():
        utils.save_checkpoint({
            'model': bare(model).state_dict(), 'optimizer': optimizer.state_dict(),
            'scaler': scaler.state_dict() if scaler is not None else None,
            'epoch': epoch, 'step_in_epoch': step_in_epoch, 'best_metric': best, 'args': vars(args),
            'rng': rng, 'world_size': utils.get_world_size(),
        }, path)
    utils.barrier()


def setup_run(args):
    """Distributed set-up, the experiment folder, logging, the saved arguments and the seed.
    Returns (rank, world size, device, logger)."""
    rank, world, local_rank = utils.init_distributed(args.device)
    device = torch.device('cuda', local_rank) if args.device == 'cuda' and world > 1 else torch.device(args.device)
    if rank == 0:
        os.makedirs(args.exp_dir, exist_ok=True)
    utils.barrier()
    logger = utils.setup_logging(os.path.join(args.exp_dir, 'train.log'), main_process=rank == 0)
    if rank == 0:
        for path, size in utils.remove_stale_temp_files(args.exp_dir):
            logger.info('removed %s (%.1f MB): the temporary file of a save that was killed midway', path,
                        size / 2 ** 20)
        utils.write_json(vars(args), os.path.join(args.exp_dir, 'args.json'))
        logger.info('command: %s', ' '.join(sys.argv))
        logger.info('arguments: %s', json.dumps(vars(args), sort_keys=True))
    utils.set_seed(args.seed + rank)
    return rank, world, device, logger


def build_train_data(args, rank, world, device, logger):
    """The training split's P x K loader for this rank. Returns (partitions, images folder, loader,
    number of identities)."""
    partitions = data.read_partitions(args.train_partitions)
    im_dir = data.partitions_images_dir(args.train_partitions)
    part = args.trainset_part
    train_tf = data.build_transform(tuple(args.resize_h_w), train=True, crop_prob=args.crop_prob,
                                    crop_ratio=args.crop_ratio, random_erasing=args.random_erasing)
    loader = data.make_train_loader(im_dir, partitions[part + '_im_names'], partitions[part + '_ids2labels'],
                                    args.ids_per_batch, args.ims_per_id, train_tf, workers=args.workers,
                                    seed=args.seed, rank=rank, world_size=world, pin_memory=device.type == 'cuda')
    num_classes = len(partitions[part + '_ids2labels'])
    logger.info('train set: %s %s, %d identities, %d images, %d steps of %d x %d per epoch on %d process(es)',
                args.train_dataset, part, num_classes, len(partitions[part + '_im_names']), len(loader),
                args.ids_per_batch, args.ims_per_id, world)
    return partitions, im_dir, loader, num_classes


def build_model(args, num_classes, device):
    """The Model the flags describe, on `device`. A resumed or tested model gets every weight from its
    checkpoint, so it skips the ImageNet weights (and works offline)."""
    from_ckpt = args.resume or args.onlytest
    try:
        model = Model(base=args.base_model, last_stride=args.last_stride,
                      local_conv_out_channels=args.local_conv_out_channels,
                      num_classes=num_classes if args.id_loss_weight > 0 else None,
                      pretrained=args.pretrained and not from_ckpt,
                      pretrained_path=None if from_ckpt else args.pretrained_path)
    except RuntimeError as e:  # ImageNet weights unreachable: say which flags help, no traceback
        raise SystemExit('{}: --pretrained true: {} To train from scratch instead, pass --pretrained false.'
                         .format(os.path.basename(sys.argv[0]), e))
    return model.to(device)


def epoch_lr(args, epoch):
    """The learning rate of (1-based) `epoch` under the schedule the flags describe."""
    return utils.lr_at_epoch(args.lr_decay_type, args.base_lr, epoch, args.total_epochs,
                             exp_decay_at_epoch=args.exp_decay_at_epoch,
                             staircase_decay_at_epochs=args.staircase_decay_at_epochs,
                             staircase_decay_multiply_factor=args.staircase_decay_multiply_factor)


# ----------------------------------------------------------------------------- main

def main(args, compute=None):
    # seed and distributed set-up
    rank, world, device, logger = setup_run(args)
    main_proc = rank == 0

    # data
    partitions, im_dir, loader, num_classes = build_train_data(args, rank, world, device, logger)
    part = args.trainset_part

    # model, loss, optimizer, schedule
    model = build_model(args, num_classes, device)
    amp_dtype, scaler = amp_settings(args.amp, device, logger)
    channels_last = amp_dtype is not None
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    losses = loss_kwargs(args)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.base_lr, weight_decay=args.weight_decay)

    # resume
    ckpt_path = os.path.join(args.exp_dir, 'ckpt.pth')
    start_epoch, start_step, best = 0, 0, None
    if args.resume or args.onlytest:
        state = utils.load_checkpoint(ckpt_path, map_location='cpu')
        bare(model).load_state_dict(state['model'])
        if args.resume:
            optimizer.load_state_dict(state['optimizer'])
            if scaler is not None and state.get('scaler'):
                scaler.load_state_dict(state['scaler'])
            start_epoch, start_step, best = state['epoch'], state.get('step_in_epoch', 0), state.get('best_metric')
            rng = state.get('rng') or []
            if len(rng) == world:
                utils.set_rng_state(rng[rank])
            logger.info('resumed from %s: %d epochs done%s', ckpt_path, start_epoch,
                        ' and {} steps of the next'.format(start_step) if start_step else '')
            if start_epoch >= args.total_epochs and not start_step:
                logger.info('the run in %s is already finished (%d of %d epochs): nothing to train. Test it '
                            'with --onlytest true, or train on with a larger --total_epochs',
                            args.exp_dir, start_epoch, args.total_epochs)
                utils.cleanup_distributed()
                return None

    # test-only early return
    if args.onlytest:
        if main_proc:
            final_test(bare(model), partitions, im_dir, args, device, logger, amp=amp_dtype is not None)
        utils.cleanup_distributed()
        return None

    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None,
                                        find_unused_parameters=args.local_loss_weight == 0 or args.global_loss_weight == 0)
    writer = make_writer(args.exp_dir) if main_proc else None
    stop = StopFlag()
    stop.install()

    # epoch loop
    for epoch in range(start_epoch + 1, args.total_epochs + 1):
        lr = epoch_lr(args, epoch)
        utils.set_lr(optimizer, lr)
        data.set_loader_epoch(loader, epoch)
        t0 = time.time()
        try:
            stats, n_images, step, stopped = train_one_epoch(
                model, loader, optimizer, scaler, device, epoch, losses, amp_dtype=amp_dtype,
                start_step=start_step if epoch == start_epoch + 1 else 0, stop=stop,
                channels_last=channels_last, logger=logger, steps_per_log=args.steps_per_log, compute=compute)
        except NonFiniteLoss as e:
            logger.error('%s; stopping. The last good checkpoint is kept: %s', e, ckpt_path)
            shutdown(stop, writer)
            raise SystemExit('train.py: {}'.format(e))
        seconds = time.time() - t0
        stats.update(lr=lr, images_per_s=n_images / max(seconds, 1e-9))
        if stopped and step < len(loader):
            save(ckpt_path, model, optimizer, scaler, epoch - 1, step, best, args)
            logger.info('stopped by signal %s at epoch %d step %d/%d; checkpoint saved to %s; continue with '
                        '--resume true', stop.signum, epoch, step, len(loader), ckpt_path)
            shutdown(stop, writer)
            raise SystemExit(128 + (stop.signum or 0))
        logger.info('epoch %d/%d  lr %.3g  %.1f images/s  %.1f s  %s', epoch, args.total_epochs, lr,
                    stats['images_per_s'], seconds,
                    '  '.join('{} {:.4f}'.format(k, v) for k, v in sorted(stats.items())
                              if k not in ('lr', 'images_per_s')))
        write_scalars(writer, stats, epoch)
        if args.epochs_per_test and epoch % args.epochs_per_test == 0 and epoch < args.total_epochs:
            if main_proc:
                split = 'val' if part == 'train' else 'test'
                results, _ = evaluate(bare(model), partitions, im_dir, split, args, device,
                                      amp=amp_dtype is not None)
                r1, mAP = float(np.asarray(results['global']['cmc'])[0]), float(results['global']['mAP'])
                logger.info('epoch %d %s: Rank-1 %.2f%%  mAP %.2f%%', epoch, split, 100 * r1, 100 * mAP)
                if writer is not None:
                    writer.add_scalars(split + '_scores', {'rank1': r1, 'mAP': mAP}, epoch)
                if best is None or r1 > best['rank1']:
                    best = {'rank1': r1, 'mAP': mAP, 'epoch': epoch, 'split': split}
            best = utils.all_gather_object(best)[0]
        save(ckpt_path, model, optimizer, scaler, epoch, 0, best, args)
        if stopped:
            logger.info('stopped by signal %s after epoch %d; checkpoint saved to %s', stop.signum, epoch, ckpt_path)
            shutdown(stop, writer)
            raise SystemExit(128 + (stop.signum or 0))
    # final test on rank 0 alone; the other ranks are done
    utils.barrier()
    shutdown(stop, writer)
    results = None
    if main_proc and args.final_test:
        results = final_test(bare(model), partitions, im_dir, args, device, logger, amp=amp_dtype is not None)
    return results


def run_cli(main_fn, parse, script='train.py'):
    """Runs a training script; a failure the user can fix (an unreadable image, a checkpoint that cannot be
    written, a folder without permission) ends it with one line, also written to train.log."""
    try:
        main_fn(parse())
    except data.UnreadableImageError as e:
        message = data.unreadable_image_line(e)
    except utils.CheckpointWriteError as e:
        message = e.strerror or str(e)
    except PermissionError as e:
        message = 'cannot write {}: {}'.format(e.filename, e.strerror) if e.filename else str(e)
    else:
        return
    utils.log_error_to_file(message)
    raise SystemExit('{}: {}'.format(script, message))


if __name__ == '__main__':
    run_cli(main, parse_args)
