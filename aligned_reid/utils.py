"""Helpers shared by the scripts: seeding, atomic checkpoints, RNG state capture, learning-rate
schedules, logging, and the torch.distributed plumbing used under torchrun."""
import argparse
import datetime
import io
import json
import logging
import os
import pickle
import random
import re
import sys

import numpy as np
import torch
import torch.distributed as dist

from aligned_reid.safe_load import load_file


# ----------------------------------------------------------------------------- seeding / parsing

def set_seed(seed):
    """Seeds python, numpy and torch (all devices) with `seed`."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def configure_determinism(deterministic):
    """deterministic: torch's deterministic algorithms, deterministic cuDNN without autotuning and the
    cuBLAS workspace setting they need (call before CUDA starts), so that a run, and a resumed run,
    repeat bit for bit on a GPU too. Otherwise cuDNN autotunes its kernels for the fixed input size."""
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(bool(deterministic))
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


_TRUE = {'true', 'yes', 'y', '1', 't', 'on'}
_FALSE = {'false', 'no', 'n', '0', 'f', 'off'}


def str2bool(v):
    """Parses a boolean word the way the original scripts did (`--resume True`).

    Accepts true/false, yes/no, y/n, t/f, on/off, 1/0 in any case; a bool passes through.
    Raises ValueError naming the value otherwise (argparse turns it into a usage error).
    """
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ValueError("expected a boolean word (true/false, yes/no, 1/0), got {!r}".format(v))



_NUMBER = re.compile(r'^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$')


def accept_negative_numbers(parser):
    """Lets `parser` read '-1e-3' as a value, not as a flag (argparse's own test misses exponents), so a
    negative number reaches the range check that names its flag. No flag of ours looks like a number."""
    parser._negative_number_matcher = _NUMBER
    return parser


def boolean(v):
    """str2bool as an argparse `type` for the original's true/false flags; the name makes argparse
    report 'invalid boolean value'."""
    return str2bool(v)

def ints(token):
    """argparse `type` taking an integer or the older reproduction's tuple syntax: '256' -> (256,),
    '(256,128)' / '256,128' / '(101, 201,)' -> (256, 128) ... Used with nargs='+' and flat_ints."""
    text = str(token).strip()
    if text.startswith('(') and text.endswith(')') or text.startswith('[') and text.endswith(']'):
        text = text[1:-1]
    parts = [t.strip() for t in text.split(',') if t.strip()]
    if not parts:
        raise ValueError('expected integers, got {!r}'.format(token))
    return tuple(int(t) for t in parts)


def flat_ints(values):
    """[(256,), (128,)] or [(256, 128)] (from nargs='+' with type ints) -> [256, 128]; lists of plain
    ints (saved arguments) pass through."""
    out = []
    for v in values:
        out.extend(v if isinstance(v, (tuple, list)) else [v])
    return [int(v) for v in out]


OLD_DEVICE_HELP = ('choose the GPUs with CUDA_VISIBLE_DEVICES=0,1 and --device cuda (or cuda:N); train on several '
                   'with torchrun --nproc_per_node N. Default: none')
OLD_RUN_HELP = 'keep repeated runs apart with --exp_dir DIR (one folder per run). Default: none'


def add_model_arguments(parser, normalize_feature=True):
    """The flags that describe a saved model, for the scripts that load one (test.py, extract.py): each
    defaults to None, meaning what the checkpoint says. `normalize_feature`: add that flag too."""
    g = parser.add_argument_group('model (read from the checkpoint; give them only for a bare state_dict)')
    g.add_argument('--base_model', choices=('resnet18', 'resnet34', 'resnet50', 'resnet101'), default=None,
                   help='backbone. Default: from the checkpoint, else resnet50')
    g.add_argument('--last_stride', type=int, choices=(1, 2), default=None,
                   help='last stride. Default: from the checkpoint, else 2')
    g.add_argument('--local_conv_out_channels', type=int, default=None,
                   help='local feature channels. Default: from the checkpoint, else 128')
    g.add_argument('--resize_h_w', type=ints, nargs='+', default=None, metavar='SIZE',
                   help="input size: two integers, or the older reproduction's tuple '(256,128)'. Default: from "
                        'the checkpoint, else 256 128')
    if normalize_feature:
        g.add_argument('--normalize_feature', type=boolean, default=None,
                       help='L2-normalise features before distances. Default: from the checkpoint, else false')
    return g


def check_model_arguments(parser, args):
    """Checks the flags of add_model_arguments, stopping with parser.error naming the flag; leaves
    --resize_h_w flattened to [H, W]."""
    if args.resize_h_w is not None:
        args.resize_h_w = flat_ints(args.resize_h_w)
        if len(args.resize_h_w) != 2:
            parser.error("--resize_h_w takes a height and a width (256 128, or '(256,128)'), got "
                         '{}'.format(' '.join(map(str, args.resize_h_w))))
        if min(args.resize_h_w) < 16:
            parser.error('--resize_h_w must be at least 16 16, got {} {}'.format(*args.resize_h_w))
    if args.local_conv_out_channels is not None and args.local_conv_out_channels < 1:
        parser.error('--local_conv_out_channels must be at least 1, got {}'.format(args.local_conv_out_channels))


class OldFlag(argparse.Action):
    """A flag of the older reproduction with no counterpart here: using it stops the parse with one
    line naming what to use instead (the action's help). Nothing is stored, so it never reaches args.json."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('default', argparse.SUPPRESS)
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error('{} is a flag of the older reproduction, not used here: {}'.format(
            option_string, self.help.split(' Default:')[0]))


# ----------------------------------------------------------------------------- checkpoints

class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, read-only folder...); the message names the path
    and says whether the previous checkpoint is intact."""


def _os_error_in(exc):
    """The OSError behind `exc` (itself, or its cause / context: torch.save turns a failed write of its
    file object into a RuntimeError whose context is the OSError), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


TEMP_SUFFIX = re.compile(r'\.tmp\.(\d+)$')  # save_checkpoint / write_json temporaries: <name>.tmp.<pid>


def save_checkpoint(state, path):
    """Writes `state` (any torch-serialisable object) to `path` atomically.

    The bytes go to `<path>.tmp.<pid>` in the same folder, are fsync-ed, and then replace `path` with
    os.replace, so a crash mid-write leaves the previous checkpoint intact (a kill -9 may leave the
    temporary file: remove_stale_temp_files clears it at the next run). The file gets the user's umask
    mode. A failed write (no space left, permission denied) raises CheckpointWriteError, one line naming
    the path, the reason and whether the previous checkpoint survives.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    tmp = '{}.tmp.{}'.format(path, os.getpid())
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        cause = _os_error_in(e)
        if cause is None:
            raise
        previous = ('the previous checkpoint {} is intact'.format(path) if os.path.isfile(path)
                    else 'no earlier checkpoint existed')
        raise CheckpointWriteError(cause.errno, 'cannot write checkpoint {}: {}; {}'.format(
            path, cause.strerror or cause, previous)) from None
    finally:
        if os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(folder):
    """Removes the `<name>.tmp.<pid>` files that a killed save_checkpoint / write_json left in `folder`
    (those whose process no longer runs). Returns [(path, size in bytes)] of the files removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = TEMP_SUFFIX.search(e.name)
        if m is None or not e.is_file(follow_symlinks=False) or _pid_alive(int(m.group(1))):
            continue
        size = e.stat(follow_symlinks=False).st_size
        try:
            os.remove(e.path)
        except OSError:
            continue
        removed.append((e.path, size))
    return removed


def writable_folder_problem(folder):
    """None when `folder` (or, if it does not exist yet, its nearest existing parent) can be written to;
    else a message naming that folder."""
    folder = os.path.abspath(folder)
    probe = folder
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return '{} is not a folder'.format(probe)
    if not os.access(probe, os.W_OK | os.X_OK):
        return '{} is not writable (permission denied){}'.format(
            probe, '' if probe == folder else ' and {} would be created in it'.format(folder))
    return None


def load_checkpoint(path, map_location='cpu'):
    """Reads a checkpoint written by save_checkpoint (or any torch file) through the safe reader
    aligned_reid.safe_load.load_file: no code from the file runs, tensors land on the CPU and are
    then moved to `map_location` when it is another device. FileNotFoundError names the path;
    aligned_reid.safe_load.CheckpointError (a ValueError) says what an unreadable file looks like."""
    obj = load_file(path)
    if map_location is None or str(map_location) == 'cpu':
        return obj
    return _to_device(obj, torch.device(map_location))


def _to_device(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return type(obj)((k, _to_device(v, device)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def get_rng_state():
    """Captures python, numpy, torch CPU and (when present) CUDA generator states."""
    state = {
        'python': random.getstate(),
        'numpy': np.random.get_state(),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restores the states captured by get_rng_state (missing entries are left alone)."""
    if 'python' in state:
        random.setstate(state['python'])
    if 'numpy' in state:
        np.random.set_state(state['numpy'])
    if 'torch' in state:
        torch.set_rng_state(torch.as_tensor(state['torch'], dtype=torch.uint8).cpu())
    if 'cuda' in state and torch.cuda.is_available():
        cuda_states = state['cuda']
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in cuda_states])


# ----------------------------------------------------------------------------- lr schedules

def exp_decay_lr(base_lr, epoch, exp_decay_at_epoch, total_epochs, final_ratio=1e-3):
    """Learning rate of the original `exp` schedule for 1-based `epoch`.

    The base rate is kept up to epoch `exp_decay_at_epoch - 1`; from there it decays
    exponentially, reaching `final_ratio * base_lr` at epoch `total_epochs`:
        lr = base_lr * final_ratio ** ((epoch + 1 - exp_decay_at_epoch) / (total_epochs + 1 - exp_decay_at_epoch))
    (the original's formula; with the published 151 / 300 the rate starts falling at epoch 151).
    """
    if epoch < exp_decay_at_epoch:
        return base_lr
    span = total_epochs + 1 - exp_decay_at_epoch
    if span <= 0:
        return base_lr * final_ratio
    return base_lr * final_ratio ** (float(epoch + 1 - exp_decay_at_epoch) / span)


def staircase_lr(base_lr, epoch, decay_at_epochs, factor):
    """Learning rate of the `staircase` schedule for 1-based `epoch`: base_lr times `factor`
    once for every entry of `decay_at_epochs` that is <= epoch."""
    n = sum(1 for e in decay_at_epochs if epoch >= e)
    return base_lr * factor ** n


def lr_at_epoch(schedule, base_lr, epoch, total_epochs, exp_decay_at_epoch=151,
                staircase_decay_at_epochs=(101, 201), staircase_decay_multiply_factor=0.1):
    """Dispatches to the named schedule ('exp' or 'staircase'); epochs are 1-based."""
    if schedule == 'exp':
        return exp_decay_lr(base_lr, epoch, exp_decay_at_epoch, total_epochs)
    if schedule == 'staircase':
        return staircase_lr(base_lr, epoch, staircase_decay_at_epochs, staircase_decay_multiply_factor)
    raise ValueError("unknown lr schedule {!r}; choose 'exp' or 'staircase'".format(schedule))


def set_lr(optimizer, lr):
    """Sets the learning rate of every parameter group."""
    for g in optimizer.param_groups:
        g['lr'] = lr


# ----------------------------------------------------------------------------- distributed

def init_distributed(device='cuda', timeout_minutes=120):
    """Starts torch.distributed when launched by torchrun (WORLD_SIZE > 1 in the environment).

    Uses NCCL for CUDA devices and gloo otherwise. The generous collective timeout lets the other
    ranks wait while rank 0 alone tests a model. Returns (rank, world_size, local_rank);
    (0, 1, 0) for a plain single-process run.
    """
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size <= 1:
        return 0, 1, 0
    rank = int(os.environ['RANK'])
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if not dist.is_initialized():
        backend = 'nccl' if str(device).startswith('cuda') else 'gloo'
        if backend == 'nccl':
            check_gpu_count(int(os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)))
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method='env://',
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank, world_size, local_rank


def check_gpu_count(processes):
    """SystemExit with one line when `processes` per machine (torchrun --nproc_per_node) exceed the GPUs
    this process can see; rank 0 of the machine says why, the others exit quietly."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if processes <= visible:
        return
    if os.environ.get('LOCAL_RANK', '0') != '0':
        raise SystemExit(1)
    seen = ' (CUDA_VISIBLE_DEVICES={})'.format(os.environ['CUDA_VISIBLE_DEVICES']) \
        if 'CUDA_VISIBLE_DEVICES' in os.environ else ''
    fix = 'pass --nproc_per_node={} or fewer, or --device cpu'.format(visible) if visible else 'pass --device cpu'
    raise SystemExit('torchrun started {} processes on this machine, but it sees {} GPU(s){}: {}'.format(
        processes, visible, seen, fix))


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main():
    """True on rank 0 (and in a single-process run): the only rank that logs and writes."""
    return get_rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


def cleanup_distributed():
    if is_dist():
        dist.destroy_process_group()


def all_gather_object(obj):
    """Gathers any picklable object from every rank; returns the list ordered by rank.

    Objects of any (and different) size are fine: they are pickled, padded to the longest,
    and gathered as byte tensors on the process group's device.
    """
    if not is_dist():
        return [obj]
    world = dist.get_world_size()
    backend = dist.get_backend()
    device = torch.device('cuda', torch.cuda.current_device()) if backend == 'nccl' else torch.device('cpu')
    buf = io.BytesIO()
    pickle.dump(obj, buf, protocol=pickle.HIGHEST_PROTOCOL)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8).to(device)
    size = torch.tensor([data.numel()], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    max_size = int(max(s.item() for s in sizes))
    padded = torch.zeros(max_size, dtype=torch.uint8, device=device)
    padded[:data.numel()] = data
    out = [torch.zeros(max_size, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(out, padded)
    return [pickle.loads(o[:int(s.item())].cpu().numpy().tobytes()) for o, s in zip(out, sizes)]


def all_gather_arrays(array):
    """Concatenates a numpy array (first axis may differ per rank) from all ranks, in rank order."""
    parts = all_gather_object(np.asarray(array))
    return np.concatenate(parts, axis=0)


def all_gather_feature_dict(feats):
    """Concatenates every array-valued entry of a feature dict (as from extract_features) over ranks.

    Entries are numpy arrays or torch tensors sharing their first axis; they come back as numpy.
    """
    local = {k: (v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)) for k, v in feats.items()}
    parts = all_gather_object(local)
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in local}


def reduce_mean_scalars(values):
    """Averages a dict of python floats over ranks (identity when not distributed)."""
    if not is_dist() or not values:
        return dict(values)
    keys = sorted(values)
    backend = dist.get_backend()
    device = torch.device('cuda', torch.cuda.current_device()) if backend == 'nccl' else torch.device('cpu')
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(x) for k, x in zip(keys, t.tolist())}


# ----------------------------------------------------------------------------- logging

def setup_logging(log_file=None, name='aligned_reid', main_process=True):
    """Returns a logger printing to stdout and, when `log_file` is given, appending to it.

    On ranks other than 0 (`main_process=False`) the logger only shows errors and writes no file.
    Calling it again replaces the handlers, so scripts may call it once per run.
    """
    logger = logging.getLogger(name)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.setLevel(logging.INFO if main_process else logging.ERROR)  # under torchrun rank 0 alone talks
    fmt = logging.Formatter('%(asctime)s %(message)s', datefmt='%Y-%m-%d %H:%M:%S')
    sh = logging.StreamHandler(sys.stdout)
    sh.setFormatter(fmt)
    logger.addHandler(sh)
    if log_file and main_process:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def log_error_to_file(message, name='aligned_reid'):
    """Appends `message` at level ERROR to the log files of logger `name` (not to the console: the
    caller prints it once as it exits)."""
    logger = logging.getLogger(name)
    record = logger.makeRecord(name, logging.ERROR, __file__, 0, message, None, None)
    for h in logger.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


# ----------------------------------------------------------------------------- experiment paths

# Where each dataset's prepare script writes by default (its --save_dir), relative to the home folder.
DATASET_DIRS = {
    'market1501': 'Dataset/market1501',
    'duke': 'Dataset/duke',
    'cuhk03': 'Dataset/cuhk03/detected',
    'cuhk03_detected': 'Dataset/cuhk03/detected',
    'cuhk03_labeled': 'Dataset/cuhk03/labeled',
    'msmt17': 'Dataset/msmt17',
    'combined': 'Dataset/combined',
    'synthetic': 'Dataset/synthetic',
}


def default_partitions_path(dataset):
    """~/Dataset/<name>/partitions.pkl (cuhk03: the detected set). ValueError for an unknown name."""
    if dataset not in DATASET_DIRS:
        raise ValueError('unknown dataset {!r}; choose one of {}'.format(dataset, ', '.join(DATASET_DIRS)))
    return os.path.join(os.path.expanduser('~'), DATASET_DIRS[dataset], 'partitions.pkl')


def default_exp_dir(train_dataset):
    """exp/train/<train_dataset>, relative to the current folder: train.py writes there and test.py
    looks there, so run both from the same folder (or pass --exp_dir to both)."""
    return os.path.join('exp', 'train', train_dataset)


def write_json(obj, path):
    """Writes `obj` as indented JSON, atomically (temporary file, then os.replace; the user's umask mode)."""
    tmp = '{}.tmp.{}'.format(path, os.getpid())
    try:
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def metrics_summary(results):
    """Plain-float summary of aligned_reid.evaluation.evaluate results for metrics.json:
    name -> rank1, rank5, rank10, mAP, cmc (to rank 50), and mINP / query counts when present."""
    out = {}
    for name, r in results.items():
        cmc = np.asarray(r['cmc'], dtype=float)
        row = {'rank1': float(cmc[0]), 'rank5': float(cmc[min(4, len(cmc) - 1)]),
               'rank10': float(cmc[min(9, len(cmc) - 1)]), 'mAP': float(r['mAP']), 'cmc': cmc[:50].tolist()}
        for k in ('mINP', 'num_valid_queries', 'num_skipped'):
            if k in r:
                row[k] = float(r[k])
        out[name] = row
    return out
