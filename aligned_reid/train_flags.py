"""The flags of train.py and train_ml.py (one parser, the mutual-learning weights added for the latter) and
their checks, which stop before anything is written with one line naming the flag; --resume / --onlytest
restore the run's saved arguments from its checkpoint, read once."""
import os

import torch

from aligned_reid import checkpoint, cli, data
from aligned_reid.cli import OldFlag, boolean, ints
from aligned_reid.loss import local_mutual_problem
from aligned_reid.model import BACKBONES, Model

NUM_MODELS = 2  # models of mutual learning (train_ml.py)


def build_parser(description, mutual=False):
    """The parser of train.py, or with `mutual` of train_ml.py (the mutual-learning flags added)."""
    p = cli.ArgumentParser(description=description)
    d = p.add_argument_group('data')
    d.add_argument('--train_dataset', '--dataset', dest='train_dataset', default=None,
                   help='dataset name; sets the default partitions path ~/Dataset/<name>/partitions.pkl and '
                        'experiment folder exp/train/<name> (one of {}; any name when a partitions file is '
                        "given; --dataset, the older reproduction's name, is accepted). Default: the name the "
                        'prepare script recorded in --train_partitons, else market1501'.format(', '.join(cli.DATASET_DIRS)))
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
    d.add_argument('--mean', type=float, nargs=3, default=None, metavar=('R', 'G', 'B'),
                   help='per-channel mean of the input normalisation (of images scaled to [0, 1]), saved with the '
                        'run. Default: the one the weights were trained with when starting from a file '
                        "(--model_weight_file, --resume, --onlytest; the older reproduction's 0.486 0.459 0.408), "
                        "else ImageNet's 0.485 0.456 0.406")
    d.add_argument('--std', type=float, nargs=3, default=None, metavar=('R', 'G', 'B'),
                   help='per-channel standard deviation of the input normalisation, saved with the run. Default: '
                        "as --mean, the weights' own, else ImageNet's 0.229 0.224 0.225")
    d.add_argument('--crop_prob', type=float, default=0., help='probability of a random crop. Default: 0')
    d.add_argument('--crop_ratio', type=float, default=1., help='side ratio of the random crop. Default: 1')
    d.add_argument('--random_erasing', type=float, default=0.,
                   help='probability of random erasing. Default: 0')
    d.add_argument('--workers', type=int, default=cli.default_workers(),
                   help='data loader worker processes (they live across epochs; with --train_pipeline memory '
                        'they only decode the set once). ' + cli.WORKERS_HELP)
    d.add_argument('--train_pipeline', choices=('auto', 'workers', 'memory'), default='auto',
                   help='workers: loader workers decode and augment every image every epoch; memory: the training '
                        'images are decoded once, kept as uint8 (on the GPU when they fit in half its free memory, '
                        'else in pinned host memory) and augmented in batch on the device; auto: memory on CUDA, '
                        'workers on the CPU. Augmentation randomness is the same function of (seed, epoch, step, '
                        'slot) in both. Default: auto')

    m = p.add_argument_group('model')
    m.add_argument('--base_model', choices=tuple(BACKBONES), default='resnet50', help='backbone. Default: resnet50')
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
    old.add_argument('-d', '--sys_device_ids', action=OldFlag, nargs='?', help=cli.OLD_DEVICE_HELP)
    old.add_argument('-r', '--run', action=OldFlag, nargs='?', help=cli.OLD_RUN_HELP)
    if mutual:
        m = p.add_argument_group('mutual learning')
        m.add_argument('-pmlw', '--prob_mutual_loss_weight', '--pm_loss_weight', dest='prob_mutual_loss_weight', type=float, default=0.,
                       help='weight of the KL divergence to the partner\'s class probabilities (needs -idlw > 0). '
                            'Default: 0')
        m.add_argument('-gdmlw', '--global_dist_mutual_loss_weight', '--gdm_loss_weight',
                       dest='global_dist_mutual_loss_weight', type=float, default=0.,
                       help='weight of the squared difference to the partner\'s global distance matrix. Default: 0')
        m.add_argument('-ldmlw', '--local_dist_mutual_loss_weight', '--ldm_loss_weight',
                       dest='local_dist_mutual_loss_weight', type=float, default=0.,
                       help='weight of the squared difference to the partner\'s local distance matrix. Default: 0')
        m.add_argument('--same_init', type=boolean, default=False,
                       help='start both models from the same weights (true/false) when they are not loaded from a '
                            'file: model 2 is initialised as model 1, local branch and classifier included, so that '
                            'at step 0 their distance matrices are equal and the distance mutual losses are 0 (as '
                            "in the older reproduction's mutual learning, both from the same ImageNet weights, with "
                            '-llw 0). false: model 2 from its own generator (with --pretrained true the backbones '
                            'still start from the same ImageNet weights). Default: false')
        m.add_argument('--num_models', type=int, default=NUM_MODELS,
                       help="the older reproduction's flag, accepted with its one value here: this script trains {} "
                            'models. Default: {}'.format(NUM_MODELS, NUM_MODELS))
        for action in p._actions:
            if action.dest == 'exp_dir':
                action.help = ('experiment folder. Default: exp/train_ml/<train_dataset> under the current folder')
    cli.accept_negative_numbers(p)
    return p


def resolve_paths(args):
    """Fills the partitions path and the experiment folder from --train_dataset where not given."""
    if args.train_partitions is None:
        args.train_partitions = cli.default_partitions_path(args.train_dataset)
    args.train_partitions = os.path.expanduser(args.train_partitions)
    if args.exp_dir is None:
        args.exp_dir = cli.default_exp_dir(args.train_dataset)
    args.exp_dir = os.path.abspath(os.path.expanduser(args.exp_dir))
    return args


# Flags that describe this machine or this invocation, never taken from a resumed run's saved arguments.
NOT_RESTORED = ('resume', 'onlytest', 'exp_dir', 'device', 'workers', 'model_weight_file', 'model_index', 'model_file',
                'start')


ARCH_FLAGS = ('base_model', 'local_conv_out_channels')


def read_partitions_flag(parser, path):
    """The partitions file of --train_partitons, read and checked, or a usage error naming the flag."""
    problem = data.partitions_file_problem(path)
    if problem:
        parser.error('--train_partitons: {}'.format(problem))
    try:
        return data.read_partitions(path)
    except (ValueError, OSError) as e:
        parser.error('--train_partitons {}: {}'.format(path, e))


def same_file(a, b):
    """Whether paths `a` and `b` name one file (both absent: the same absolute path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def read_model_file(parser, flag, path, model_index, obj=None):
    """aligned_reid.checkpoint.read_checkpoint, with a failure turned into one line naming the flag."""
    try:
        return checkpoint.read_checkpoint(path, model_index, obj=obj)
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
    exp_dir = os.path.abspath(os.path.expanduser(args.exp_dir or cli.default_exp_dir(args.train_dataset)))
    ckpt = checkpoint.path_in(exp_dir)
    if args.onlytest and not args.resume and args.model_weight_file:
        ckpt, flag = os.path.abspath(os.path.expanduser(args.model_weight_file)), '--model_weight_file'
    elif not os.path.isfile(ckpt):
        parser.error('{} true: no checkpoint at {} (train first, or point --exp_dir / --train_dataset at '
                     'the run)'.format(flag, ckpt))
    info = read_model_file(parser, flag, ckpt, args.model_index)
    info['path'], info['flag'] = ckpt, flag
    if args.resume and not info['args']:
        parser.error('--resume true: {} is {}: it holds no saved arguments nor optimizer and RNG states of this '
                     'code, so it cannot be resumed exactly; test it with --onlytest true, or start a new run '
                     'from its weights with --model_weight_file {} --exp_dir NEW_FOLDER'.format(
                         ckpt, info['layout'], ckpt))
    saved_parts = info['args'].get('train_partitions')
    if args.resume and 'train_partitions' in explicit and saved_parts and not same_file(
            os.path.expanduser(args.train_partitions), saved_parts):
        parser.error('--train_partitons {}: the run in {} was trained on {}; resume it on that file (or drop the '
                     'flag), or start a new run from its weights with --model_weight_file {} --exp_dir '
                     'NEW_FOLDER'.format(args.train_partitions, exp_dir, saved_parts, ckpt))
    for k in ('resize_h_w', 'normalize_feature'):
        if args.onlytest and k in explicit and k in info['args'] and getattr(args, k) != info['args'][k]:
            parser.error('--{} {}: {} was trained with --{} {}, and --onlytest writes the run\'s metrics.json; drop '
                         'the flag, or test at other settings with script/test.py --allow_other_settings true'.format(
                             k, cli.flag_value(getattr(args, k)), ckpt, k, cli.flag_value(info['args'][k])))
    for k, v in info['args'].items():
        if k in NOT_RESTORED or k in explicit or not hasattr(args, k):
            continue
        setattr(args, k, v)
    if args.resume and 'last_stride' in explicit and args.last_stride != info['args'].get('last_stride', 2):
        parser.error('--last_stride {}: the run in {} was trained with --last_stride {}; drop the flag'.format(
            args.last_stride, exp_dir, info['args'].get('last_stride', 2)))
    fit_architecture(parser, args, explicit, info, flag)
    args.model_file, args.start = ckpt, info
    args.exp_dir = exp_dir
    return args


NORMALISATION = ('mean', 'std')


def set_normalisation(parser, args, info, given):
    """args.mean / args.std: those given (--mean / --std), else the ones the weights to start from were
    trained with (`info`: the file read; aligned_reid.checkpoint.resolve_config: a run's saved ones, the older
    reproduction's own), else ImageNet's. Starting from weights must not silently change the input they
    expect; engine.start_from_file logs which it is."""
    for k, v in given.items():
        if k == 'std' and min(v) <= 0:
            parser.error('--std must be positive, got {}'.format(' '.join(map(str, v))))
    if info is None:
        args.mean = list(given.get('mean', data.IMAGENET_MEAN))
        args.std = list(given.get('std', data.IMAGENET_STD))
    else:
        cfg = checkpoint.resolve_config(info, given)
        args.mean, args.std = cfg['mean'], cfg['std']


def check_weights_fit(parser, args, explicit, num_classes, num_models):
    """Loads what the run will load into models built on the meta device, by the code that loads them later
    (checkpoint.load_into, Model.load_backbone_state) but with no data copied: the weights to start from or
    resume (args.start, model by model: checkpoint.models_to_load, kept in args.start['indices'] for
    engine.start_from_file), or else the --pretrained_path backbone. Weights that do not fit the model the
    flags describe stop here with one line naming the flag, before anything is written."""
    with torch.device('meta'):
        model = Model(base=args.base_model, last_stride=args.last_stride,
                      local_conv_out_channels=args.local_conv_out_channels,
                      num_classes=num_classes if args.id_loss_weight > 0 else None, pretrained=False)
    info = args.start
    if info is not None:
        own_run = bool(args.resume or args.onlytest)
        info['indices'] = checkpoint.models_to_load(num_models, info['num_models'], args.model_index, own_run,
                                                    index_given='model_index' in explicit)
        for index in sorted(set(info['indices'])):
            ckpt = info if index == info['index'] else read_model_file(parser, info['flag'], info['path'], index,
                                                                       obj=info['object'])
            try:
                checkpoint.load_into(model, checkpoint.meta_state(ckpt['state']), info['path'], ckpt['layout'],
                                     classifier='drop' if own_run else 'new')
            except ValueError as e:
                parser.error('{}: {}'.format(info['flag'], e))
    elif args.pretrained_path is not None:
        try:
            state, layout = checkpoint.backbone_state(args.pretrained_path)
            model.load_backbone_state(checkpoint.meta_state(state), '{} ({})'.format(args.pretrained_path, layout))
        except (ValueError, OSError) as e:
            parser.error('--pretrained_path: {}'.format(e))


def check_args(parser, args, explicit=(), mutual=False):
    """Stops at once, naming the flag, on combinations that cannot run. Returns args with paths filled;
    args.start holds the checkpoint read for --resume / --onlytest / --model_weight_file (read once).
    `explicit`: names given on the command line (they win over a resumed run's saved arguments);
    `mutual`: train_ml.py's flags (its default experiment folder, the mutual-learning weights)."""
    early = None  # (path, partitions) when read here for the dataset name the prepare script recorded
    if args.train_dataset is None:
        recorded = None
        if args.train_partitions is not None:
            path = os.path.expanduser(args.train_partitions)
            early = path, read_partitions_flag(parser, path)
            recorded = early[1].get('dataset')
        args.train_dataset = recorded or 'market1501'
    if mutual and args.exp_dir is None:
        args.exp_dir = os.path.join('exp', 'train_ml', args.train_dataset)
    args.resize_h_w = cli.flat_ints(args.resize_h_w)
    if len(args.resize_h_w) != 2:
        parser.error("--resize_h_w takes a height and a width (256 128, or '(256,128)'), got {}".format(
            ' '.join(map(str, args.resize_h_w))))
    args.staircase_decay_at_epochs = cli.flat_ints(args.staircase_decay_at_epochs)
    if args.model_index < 1:
        parser.error('--model_index must be at least 1 (models are counted from 1), got {}'.format(args.model_index))
    if args.set_seed and 'seed' not in explicit:
        args.seed = 1
    given = {k: [float(v) for v in getattr(args, k)] for k in NORMALISATION if getattr(args, k) is not None}
    args.model_file, args.start = None, None
    if args.resume or args.onlytest:
        restore_saved_args(parser, args, explicit)
    elif args.model_weight_file is not None:
        info = read_model_file(parser, '--model_weight_file', args.model_weight_file, args.model_index)
        info['path'], info['flag'] = args.model_weight_file, '--model_weight_file'
        fit_architecture(parser, args, explicit, info, '--model_weight_file')
        args.model_file, args.start = os.path.abspath(args.model_weight_file), info
    # The normalisation the weights are trained and tested with, saved with them.
    set_normalisation(parser, args, args.start, given)
    if args.train_partitions is None and args.train_dataset not in cli.DATASET_DIRS:
        parser.error('--train_dataset {!r} is unknown: choose one of {} or give --train_partitons'.format(
            args.train_dataset, ', '.join(cli.DATASET_DIRS)))
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
    cli.check_device(parser, args)
    parts = early[1] if early and early[0] == args.train_partitions else read_partitions_flag(
        parser, args.train_partitions)
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
    problem = cli.writable_folder_problem(args.exp_dir)
    if problem:
        parser.error('--exp_dir: {}; give another --exp_dir'.format(problem))
    if mutual:
        check_mutual_args(parser, args)
    check_weights_fit(parser, args, explicit, num_ids, NUM_MODELS if mutual else 1)
    return args


def check_mutual_args(parser, args):
    """train_ml.py's own flags."""
    if args.num_models != NUM_MODELS:
        parser.error('--num_models {}: train_ml.py trains {} models; for one, use train.py'.format(
            args.num_models, NUM_MODELS))
    for flag in ('prob_mutual_loss_weight', 'global_dist_mutual_loss_weight', 'local_dist_mutual_loss_weight'):
        if getattr(args, flag) < 0:
            parser.error('--{} must not be negative, got {}'.format(flag, getattr(args, flag)))
    if args.prob_mutual_loss_weight > 0 and args.id_loss_weight == 0:
        parser.error('-pmlw {} needs the classifier: give -idlw > 0'.format(args.prob_mutual_loss_weight))
    problem = local_mutual_problem(args.local_dist_mutual_loss_weight, args.local_dist_own_hard_sample)
    if problem:
        parser.error(problem)
