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

from aligned_reid import checkpoint, data, utils
from aligned_reid.augment import Augment
from aligned_reid.utils import boolean, ints, OldFlag
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
    'speed': {'images_per_s': 'images_per_s', 'data_wait_share': 'data_wait', 'first_batch_s': 'first_batch_s'},
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__)
    d = p.add_argument_group('data')
    d.add_argument('--train_dataset', '--dataset', dest='train_dataset', default='market1501',
                   help='dataset name; sets the default partitions path ~/Dataset/<name>/partitions.pkl and '
                        'experiment folder exp/train/<name> (one of {}; any name when a partitions file is '
                        "given; --dataset, the older reproduction's name, is accepted). Default: market1501".format(', '.join(utils.DATASET_DIRS)))
    d.add_argument('--train_partitons', '--train_partitions', dest='train_partitions', default=None,
                   help='partitions.pkl of the training set (the original spelling and the correct one are '
                        'both accepted). Default: ~/Dataset/<train_dataset>/partitions.pkl')
    d.add_argument('--trainset_part', choices=('trainval', 'train'), default='trainval',
                   help='train on all training ids (trainval) or on train minus the 100 validation ids '
                        '(train; periodic tests then use the validation split). Default: trainval')
    d.add_argument('--ids_per_batch', type=int, default=32, help='P, identities per batch. Default: 32')
    d.add_argument('--ims_per_id', type=int, default=4, help='K, images per identity. Default: 4')
    d.add_argument('--resize_h_w', type=ints, nargs='+', default=[256, 128], metavar='SIZE',
                   help="input height and width: two integers, or the older reproduction's tuple '(256,128)'. "
                        'Default: 256 128')
    d.add_argument('--crop_prob', type=float, default=0., help='probability of a random crop. Default: 0')
    d.add_argument('--crop_ratio', type=float, default=1., help='side ratio of the random crop. Default: 1')
    d.add_argument('--random_erasing', type=float, default=0.,
                   help='probability of random erasing. Default: 0')
    d.add_argument('--workers', type=int, default=4,
                   help='data loader worker processes (they live across epochs; with --train_pipeline memory '
                        'they only decode the set once). Default: 4')
    d.add_argument('--train_pipeline', choices=('auto', 'workers', 'memory'), default='auto',
                   help='workers: loader workers decode and augment every image every epoch; memory: the training '
                        'images are decoded once, kept as uint8 (on the GPU when they fit in half its free memory, '
                        'else in pinned host memory) and augmented in batch on the device; auto: memory on CUDA, '
                        'workers on the CPU. Augmentation randomness is the same function of (seed, epoch, step, '
                        'slot) in both. Default: auto')

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
                   help='load backbone weights from this file instead of downloading: a torchvision ResNet state '
                        "dict, or the backbone of any whole-model file --model_weight_file reads. Default: none")
    m.add_argument('--model_weight_file', default=None,
                   help='weights of a whole model to start training from (a train.py / train_ml.py checkpoint, a '
                        "state dict, or the older reproduction's model_weight.pth / ckpt.pth; the architecture "
                        'is read from the weights), or, with --onlytest true, to test. Default: none')
    m.add_argument('--model_index', type=int, default=1,
                   help='which model of a mutual-learning checkpoint --model_weight_file / --onlytest use '
                        '(1-based). Default: 1')

    l = p.add_argument_group('loss')
    l.add_argument('--normalize_feature', type=boolean, default=False,
                   help='L2-normalise features (global per vector, local per stripe) for the losses and the test '
                        'distances (true/false). Default: false')
    l.add_argument('-gm', '--global_margin', type=float, default=0.3, help='global triplet margin. Default: 0.3')
    l.add_argument('-lm', '--local_margin', type=float, default=0.3, help='local triplet margin. Default: 0.3')
    l.add_argument('-glw', '--global_loss_weight', '--g_loss_weight', dest='global_loss_weight', type=float, default=1., help='global loss weight. Default: 1')
    l.add_argument('-llw', '--local_loss_weight', '--l_loss_weight', dest='local_loss_weight', type=float, default=0., help='local loss weight. Default: 0')
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
    o.add_argument('--staircase_decay_at_epochs', type=ints, nargs='+', default=[101, 201],
                   help="staircase: epochs at which the rate is multiplied by the factor (or the older "
                        "reproduction's tuple '(101,201,)'). Default: 101 201")
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
    r.add_argument('--deterministic', type=boolean, default=False,
                   help='deterministic algorithms and cuDNN settings (true/false), so that resuming on a GPU is '
                        'exact too; slower on CUDA (no cuDNN autotuning, deterministic kernels). Default: false')
    r.add_argument('--set_seed', type=boolean, default=None,
                   help="the older reproduction's flag, accepted: true means --seed 1; runs here are always "
                        'seeded (--seed), so false changes nothing. Default: none')
    r.add_argument('--log_to_file', type=boolean, default=None,
                   help="the older reproduction's flag, accepted: train.log in the experiment folder is always "
                        'written. Default: none')
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
    old = p.add_argument_group("the older reproduction's flags with no counterpart here (each stops with a line "
                               'naming what to use instead)')
    old.add_argument('-d', '--sys_device_ids', action=OldFlag, nargs='?', help=utils.OLD_DEVICE_HELP)
    old.add_argument('-r', '--run', action=OldFlag, nargs='?', help=utils.OLD_RUN_HELP)
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
NOT_RESTORED = ('resume', 'onlytest', 'exp_dir', 'device', 'workers', 'model_weight_file', 'model_index', 'model_file')


def explicit_dests(argv, builder=None):
    """The argument names given on the command line `argv` (a parser whose defaults are all suppressed
    keeps only those). `builder`: the function building the script's parser (default: this one's)."""
    quiet = (builder or build_parser)()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_known_args(argv)[0]))


ARCH_FLAGS = ('base_model', 'local_conv_out_channels')


def read_model_file(parser, flag, path, model_index):
    """aligned_reid.checkpoint.read_checkpoint, with a failure turned into one line naming the flag."""
    try:
        return checkpoint.read_checkpoint(path, model_index)
    except (ValueError, OSError) as e:
        parser.error('{}: {}'.format(flag, e))


def fit_architecture(parser, args, explicit, info, flag):
    """Takes --base_model / --local_conv_out_channels from the weights; one given on the command line that
    contradicts them stops here, before a model is built."""
    for k in ARCH_FLAGS:
        if k in explicit and getattr(args, k) != info[k]:
            parser.error('--{} {}: {} {} holds a model with {} {} ({}); drop the flag'.format(
                k, getattr(args, k), flag, info['path'], k, info[k], info['layout']))
        setattr(args, k, info[k])


def restore_saved_args(parser, args, explicit):
    """--resume / --onlytest: reads and recognises the checkpoint of the experiment folder (or, with
    --onlytest, --model_weight_file) before anything is written, then gives every flag not given on the
    command line the value saved inside that checkpoint (not a loose args.json, which a failed run may
    have left), so `python train.py --resume true` continues that run as it was set up. The older
    reproduction's ckpt.pth can be tested; it cannot be resumed (no saved arguments, RNG states)."""
    flag = '--resume' if args.resume else '--onlytest'
    exp_dir = os.path.abspath(os.path.expanduser(args.exp_dir or utils.default_exp_dir(args.train_dataset)))
    ckpt = os.path.join(exp_dir, 'ckpt.pth')
    if args.onlytest and not args.resume and args.model_weight_file:
        ckpt, flag = os.path.abspath(os.path.expanduser(args.model_weight_file)), '--model_weight_file'
    elif not os.path.isfile(ckpt):
        parser.error('{} true: no checkpoint at {} (train first, or point --exp_dir / --train_dataset at '
                     'the run)'.format(flag, ckpt))
    info = read_model_file(parser, flag, ckpt, args.model_index)
    info['path'] = ckpt
    if args.resume and not info['args']:
        parser.error('--resume true: {} is {}: it holds no saved arguments nor optimizer and RNG states of this '
                     'code, so it cannot be resumed exactly; test it with --onlytest true, or start a new run '
                     'from its weights with --model_weight_file {} --exp_dir NEW_FOLDER'.format(
                         ckpt, info['layout'], ckpt))
    for k, v in info['args'].items():
        if k in NOT_RESTORED or k in explicit or not hasattr(args, k):
            continue
        setattr(args, k, v)
    if args.resume and 'last_stride' in explicit and args.last_stride != info['args'].get('last_stride', 2):
        parser.error('--last_stride {}: the run in {} was trained with --last_stride {}; drop the flag'.format(
            args.last_stride, exp_dir, info['args'].get('last_stride', 2)))
    fit_architecture(parser, args, explicit, info, flag)
    cfg = checkpoint.resolve_config(info)
    args.mean, args.std = cfg['mean'], cfg['std']
    args.model_file = ckpt
    args.exp_dir = exp_dir
    return args


def check_args(parser, args, explicit=()):
    """Stops at once, naming the flag, on combinations that cannot run. Returns args with paths filled.
    `explicit`: names given on the command line (they win over a resumed run's saved arguments)."""
    args.resize_h_w = utils.flat_ints(args.resize_h_w)
    if len(args.resize_h_w) != 2:
        parser.error("--resize_h_w takes a height and a width (256 128, or '(256,128)'), got {}".format(
            ' '.join(map(str, args.resize_h_w))))
    args.staircase_decay_at_epochs = utils.flat_ints(args.staircase_decay_at_epochs)
    if args.model_index < 1:
        parser.error('--model_index must be at least 1 (models are counted from 1), got {}'.format(args.model_index))
    if args.set_seed and 'seed' not in explicit:
        args.seed = 1
    # The normalisation the weights are trained and tested with, saved with them (the older reproduction's
    # differs; restore_saved_args takes a checkpoint's).
    args.mean, args.std = list(data.IMAGENET_MEAN), list(data.IMAGENET_STD)
    args.model_file = None
    if args.resume or args.onlytest:
        restore_saved_args(parser, args, explicit)
    elif args.model_weight_file is not None:
        info = read_model_file(parser, '--model_weight_file', args.model_weight_file, args.model_index)
        info['path'] = args.model_weight_file
        fit_architecture(parser, args, explicit, info, '--model_weight_file')
        args.model_file = os.path.abspath(args.model_weight_file)
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
                local_dist_own_hard_sample=args.local_dist_own_hard_sample, label_smoothing=args.label_smoothing,
                check_batch=False)  # the P x K sampler (P, K >= 2) gives every anchor a positive and a negative


class DeviceStats:
    """Per-step scalars of a loss dict summed on the device, read only when asked (log time, epoch end).
    The loss terms (keys ending in 'loss') come first; `add` returns them as one tensor [T] for the
    step's single read."""

    def __init__(self):
        self.keys, self.terms, self.sum, self.n = None, None, None, 0

    def add(self, result):
        if self.keys is None:
            scalars = [k for k, v in result.items() if torch.is_tensor(v) and v.numel() == 1]
            self.terms = [k for k in scalars if k.endswith('loss')]
            self.keys = self.terms + sorted(k for k in scalars if k not in self.terms)
        vec = torch.stack([result[k].detach().float().reshape(()) for k in self.keys])
        self.sum = vec if self.sum is None else self.sum + vec
        self.n += 1
        return vec[:len(self.terms)]

    def means(self):
        if not self.n:
            return {}
        return {k: v / self.n for k, v in zip(self.keys, self.sum.tolist())}


def read_step(terms, stop, device):
    """The one device-to-host read of a training step: the loss terms [T] of this rank, and whether any
    rank has a non-finite term or a stop request. Returns (values, any non-finite, stop now)."""
    requested = stop is not None and stop.requested
    if not utils.is_dist():
        values = terms.tolist()
        return values, not all(math.isfinite(v) for v in values), requested
    flags = torch.stack([(~torch.isfinite(terms)).any().float(),
                         torch.tensor(float(requested)).to(device)])
    torch.distributed.all_reduce(flags)
    out = torch.cat([terms, flags]).tolist()
    return out[:-2], out[-2] > 0, out[-1] > 0


def non_finite_message(names, values, epoch, step, total):
    bad = [(k, v) for k, v in zip(names, values) if not math.isfinite(v)]
    what = '{} = {}'.format(*bad[0]) if bad else 'a loss term on another rank'
    return 'non-finite loss: {} at epoch {} step {}/{}'.format(what, epoch, step, total)


class EpochTimer:
    """Wall time of an epoch, the share of it spent waiting for the next batch, and the latency of the
    first batch (the time a restarted loader would add at every epoch)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.wait, self.first = 0., None

    def batches(self, iterable):
        it = iter(iterable)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            now = time.perf_counter()
            self.wait += now - t
            if self.first is None:
                self.first = now - self.start
            yield batch

    def stats(self):
        seconds = time.perf_counter() - self.start
        return seconds, {'data_wait': self.wait / max(seconds, 1e-9), 'first_batch_s': self.first or 0.}


def optimizer_step(optimizer, scaler):
    """optimizer.step(), through the GradScaler when float16 autocast uses one."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def epoch_means(timer, stats):
    """(the epoch's statistics averaged over its steps and the ranks, with its timing; its seconds)."""
    seconds, timing = timer.stats()
    means = utils.reduce_mean_scalars(stats.means())
    means.update(timing)
    return means, seconds


def train_one_epoch(model, loader, optimizer, scaler, device, epoch, losses, amp_dtype=None, start_step=0,
                    stop=None, channels_last=False, logger=None, steps_per_log=0, compute=None):
    """One pass over the P x K loader from `start_step`. Returns (mean statistics, images seen on all ranks,
    steps done, stopped early, seconds).

    Statistics stay on the device. The step's one device-to-host read (`read_step`: the loss terms plus
    the non-finite and stop flags of all ranks) comes after backward and before optimizer.step, so a
    non-finite loss raises NonFiniteLoss naming the term, epoch and step before any update uses it."""
    compute = compute or compute_losses
    model.train()
    world = utils.get_world_size()
    total = len(loader)
    loader.set_epoch(epoch, start_step)
    timer, stats = EpochTimer(), DeviceStats()
    n_images, stopped, step = 0, False, start_step
    bar = tqdm(total=total, initial=start_step, desc='epoch {}'.format(epoch), disable=not utils.is_main(),
               leave=False, dynamic_ncols=True)
    try:  # the bar is cleared however the epoch ends (an error message then starts its own line)
        for step, (images, labels) in enumerate(timer.batches(loader), start=start_step + 1):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = model(images)
            outputs = {k: v.float() for k, v in outputs.items()}
            result = compute(outputs, labels, **losses)
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(result['loss']) if scaler is not None else result['loss']).backward()
            values, any_bad, stop_now = read_step(stats.add(result), stop, device)
            if any_bad:
                raise NonFiniteLoss(non_finite_message(stats.terms, values, epoch, step, total))
            optimizer_step(optimizer, scaler)
            n_images += images.shape[0] * world
            bar.update()
            bar.set_postfix(loss='{:.4f}'.format(values[stats.terms.index('loss')]), refresh=False)
            if steps_per_log and step % steps_per_log == 0 and logger is not None:
                logger.info('epoch %d step %d/%d  %s', epoch, step, total,
                            '  '.join('{} {:.4f}'.format(k, v) for k, v in sorted(stats.means().items())))
            if stop_now:
                stopped = True
                break
    finally:
        bar.close()
    means, seconds = epoch_means(timer, stats)
    return means, n_images, step, stopped, seconds


def evaluate(model, partitions, im_dir, split, args, device, distances=('global',), re_rank=False, amp=False):
    """Extracts features of `split` ('test' or 'val') with the bare model and evaluates them.
    Returns (results dict from aligned_reid.evaluation.evaluate, printable table)."""
    from aligned_reid import evaluation
    transform = data.build_transform(tuple(args.resize_h_w), train=False, mean=getattr(args, 'mean', data.IMAGENET_MEAN),
                                     std=getattr(args, 'std', data.IMAGENET_STD))
    names, marks = evaluation.test_images(partitions, split)  # the multi-query images are not used here
    loader = data.make_test_loader(im_dir, names, marks, transform, batch_size=args.test_batch_size, workers=args.workers,
                                   pin_memory=device.type == 'cuda')
    feats = evaluation.extract_features(model, loader, device, amp=amp)
    results = evaluation.evaluate(feats, distances=distances, re_rank=re_rank, ap_mode=args.ap_mode,
                                  normalize=args.normalize_feature, device=device)
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
    utils.configure_determinism(args.deterministic)
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
    """The training split's P x K batches for this rank, through the --train_pipeline the flags and the
    device select. Returns (partitions, images folder, loader, number of identities)."""
    partitions = data.read_partitions(args.train_partitions)
    im_dir = data.partitions_images_dir(args.train_partitions)
    part = args.trainset_part
    names = partitions[part + '_im_names']
    augment = Augment(tuple(args.resize_h_w), crop_prob=args.crop_prob, crop_ratio=args.crop_ratio,
                      random_erasing=args.random_erasing, seed=args.seed, mean=args.mean, std=args.std)
    pipeline, store = data.choose_train_pipeline(args.train_pipeline, device, len(names), args.resize_h_w)
    t0 = time.perf_counter()
    loader = data.make_train_loader(im_dir, names, partitions[part + '_ids2labels'], args.ids_per_batch,
                                    args.ims_per_id, augment, workers=args.workers, seed=args.seed, rank=rank,
                                    world_size=world, device=device, pipeline=pipeline, store=store)
    num_classes = len(partitions[part + '_ids2labels'])
    logger.info('train set: %s %s, %d identities, %d images, %d steps of %d x %d per epoch on %d process(es)',
                args.train_dataset, part, num_classes, len(names), len(loader), args.ids_per_batch,
                args.ims_per_id, world)
    if pipeline == 'memory':
        logger.info('input pipeline: memory (%.2f GB of uint8 images decoded in %.1f s, kept %s; augmented in '
                    'batch on %s)', data.training_set_bytes(len(names), args.resize_h_w) / 1e9,
                    time.perf_counter() - t0, 'on ' + str(device) if store == 'device' or device.type != 'cuda'
                    else 'in pinned host memory', device)
    else:
        logger.info('input pipeline: %d persistent loader worker(s)%s', args.workers,
                    '' if args.workers else ' (0: decoding in the training process)')
    return partitions, im_dir, loader, num_classes


def build_model(args, num_classes, device):
    """The Model the flags describe, on `device`. A resumed or tested model gets every weight from its
    checkpoint, so it skips the ImageNet weights (and works offline)."""
    from_ckpt = args.resume or args.onlytest or bool(getattr(args, 'model_file', None))
    try:
        model = Model(base=args.base_model, last_stride=args.last_stride,
                      local_conv_out_channels=args.local_conv_out_channels,
                      num_classes=num_classes if args.id_loss_weight > 0 else None,
                      pretrained=args.pretrained and not from_ckpt,
                      pretrained_path=None if from_ckpt else args.pretrained_path)
    except RuntimeError as e:  # ImageNet weights unreachable: say which flags help, no traceback
        raise SystemExit('{}: --pretrained true: {} To train from scratch instead, pass --pretrained false.'
                         .format(os.path.basename(sys.argv[0]), e))
    except ValueError as e:  # a --pretrained_path file that is unreadable or does not fit the backbone
        raise SystemExit('{}: --pretrained_path: {}'.format(os.path.basename(sys.argv[0]), e))
    return model.to(device)


def load_model_file(args, model, logger):
    """Loads the weights of args.model_file (the checkpoint resumed or tested, or --model_weight_file to start
    from), checked key by key by aligned_reid.checkpoint.load_into; a file that does not fit stops the run with
    one line. Returns the whole object the file holds (optimizer and RNG states of a checkpoint of ours)."""
    name = os.path.basename(sys.argv[0]) or 'train.py'
    try:
        info = checkpoint.read_checkpoint(args.model_file, args.model_index)
        notes = checkpoint.load_into(model, info['state'], args.model_file, info['layout'],
                                     classifier='drop' if args.resume or args.onlytest else 'new')
    except (ValueError, OSError) as e:
        raise SystemExit('{}: {}'.format(name, e))
    logger.info('weights from %s (%s)%s', args.model_file, info['layout'],
                ''.join('; ' + n for n in info['notes'] + notes))
    return info['object']


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
    if args.model_file:
        state = load_model_file(args, bare(model), logger)
        if args.resume:
            try:
                optimizer.load_state_dict(state['optimizer'])
            except (KeyError, ValueError) as e:
                raise SystemExit('train.py: --resume true: the optimizer state of {} does not fit this model ({}); '
                                 'keep the run\'s flags (-idlw, --base_model) or use another --exp_dir'.format(
                                     ckpt_path, e))
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
        try:
            stats, n_images, step, stopped, seconds = train_one_epoch(
                model, loader, optimizer, scaler, device, epoch, losses, amp_dtype=amp_dtype,
                start_step=start_step if epoch == start_epoch + 1 else 0, stop=stop,
                channels_last=channels_last, logger=logger, steps_per_log=args.steps_per_log, compute=compute)
        except NonFiniteLoss as e:
            logger.error('%s; stopping. The last good checkpoint is kept: %s', e, ckpt_path)
            shutdown(stop, writer)
            raise SystemExit('train.py: {}'.format(e))
        stats.update(lr=lr, images_per_s=n_images / max(seconds, 1e-9))
        if stopped and step < len(loader):
            save(ckpt_path, model, optimizer, scaler, epoch - 1, step, best, args)
            logger.info('stopped by signal %s at epoch %d step %d/%d; checkpoint saved to %s; continue with '
                        '--resume true', stop.signum, epoch, step, len(loader), ckpt_path)
            shutdown(stop, writer)
            raise SystemExit(128 + (stop.signum or 0))
        logger.info('epoch %d/%d  lr %.3g  %.1f images/s  %.1f s  data wait %.1f%%  first batch %.2f s  %s', epoch,
                    args.total_epochs, lr, stats['images_per_s'], seconds, 100 * stats['data_wait'],
                    stats['first_batch_s'], '  '.join('{} {:.4f}'.format(k, v) for k, v in sorted(stats.items())
                                                      if k not in ('lr', 'images_per_s', 'data_wait', 'first_batch_s')))
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
