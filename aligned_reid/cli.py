"""What the scripts share on the command line: the parser (no abbreviated flags, one-line usage errors), flag
types (true/false words, the older reproduction's tuples), the model flags of the scripts that load a model,
default dataset and experiment paths, the device and folder checks, logging, and the one-line exit for a
failure the user can fix."""
import argparse
import errno
import logging
import os
import re
import sys

import torch

from aligned_reid import data
from aligned_reid.checkpoint import CheckpointWriteError
from aligned_reid.model import BACKBONES


class ArgumentParser(argparse.ArgumentParser):
    """The parser of every script (script/, data_set/, bench/). Flags must be spelled out: argparse's
    prefix matching is off, so a mistyped '--lr 1e-3' is refused instead of read as --lr_decay_type. A
    usage error is one line, '<script>: error: <message>; see <script> --help', without the usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('allow_abbrev', False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, '{}: error: {}; see {} --help\n'.format(self.prog, message, self.prog))


def default_workers():
    """Loader worker processes by default: 4, or fewer when fewer CPUs are available to this process
    (more workers than CPUs only compete, and torch warns about them)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


WORKERS_HELP = 'Default: min(4, CPUs available to this process)'


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


def flag_value(value):
    """A flag's value as typed on the command line: [256, 128] -> '256 128', True -> 'true'."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ' '.join(map(str, value))
    return str(value)


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
    g.add_argument('--base_model', choices=tuple(BACKBONES), default=None,
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


class RefusedFlag(argparse.Action):
    """A flag a script accepts only to refuse it: using it stops the parse with one line, '<flag> is <what>:
    <what to use instead>' (the action's help up to its default). Nothing is stored, so it never reaches
    args.json."""
    what = 'not used here'

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('default', argparse.SUPPRESS)
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error('{} is {}: {}'.format(option_string, self.what, self.help.split(' Default:')[0].rstrip('.')))


class OldFlag(RefusedFlag):
    """A flag of the older reproduction with no counterpart here."""
    what = 'a flag of the older reproduction, not used here'


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


def add_device_argument(parser):
    parser.add_argument('--device', default=None,
                        help="'cpu', 'cuda' or 'cuda:N'. Default: cuda when available, else cpu")


def check_device(parser, args):
    """Fills --device (cuda when available, else cpu) and stops with parser.error on one this machine
    cannot use."""
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if not (args.device == 'cpu' or re.fullmatch(r'cuda(:\d+)?', args.device)):
        parser.error("--device must be 'cpu', 'cuda' or 'cuda:N', got {!r}".format(args.device))
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error('--device {}: CUDA is not available on this machine'.format(args.device))


def explicit_dests(build_parser, argv):
    """The argument names given on the command line `argv` of the parser `build_parser()` builds (a copy
    whose defaults are all suppressed keeps only those): they win over a run's saved arguments."""
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_known_args(argv)[0]))


# errno of a write the file system refuses: no space left, over quota, read-only, file too large
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def run_cli(main, parse_args, script, log_to_file=False, errors=(), interrupted='interrupted'):
    """Runs `main(parse_args())`; a failure the user can fix (an unreadable image, a checkpoint that cannot be
    written, a folder without permission, a file (args.json, metrics, the log) that a full or read-only disk
    refuses, and the exception classes in `errors`) ends the script with one line '<script>: <message>'
    instead of a traceback (with `log_to_file`, also written to the run's log when it can be).
    A Ctrl-C (KeyboardInterrupt) ends it with the line '<script>: <interrupted>' and exit status 130."""
    code = 1
    try:
        main(parse_args())
        return
    except data.UnreadableImageError as e:  # also from a loader worker, whose traceback it carries
        message = data.unreadable_image_line(e)
    except CheckpointWriteError as e:
        message = e.strerror or str(e)
    except PermissionError as e:
        message = 'cannot write {}: {}'.format(e.filename, e.strerror) if e.filename else str(e)
    except tuple(errors) as e:
        message = str(e)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        message = 'cannot write {}: {}'.format(e.filename, e.strerror) if e.filename else str(e)
    except KeyboardInterrupt:
        message, code = interrupted, 130
    if log_to_file:
        try:
            log_error_to_file(message)
        except OSError:  # the log is on the disk that failed
            pass
    if code == 1:
        raise SystemExit('{}: {}'.format(script, message))
    print('{}: {}'.format(script, message), file=sys.stderr)   # SystemExit(str) would exit 1
    raise SystemExit(code)


# ----------------------------------------------------------------------------- logging

class LogFile(logging.FileHandler):
    """A run's log file. A write that fails (a full disk) stops the run: the OSError, naming the file,
    reaches the caller (run_cli makes it one line) instead of logging's '--- Logging error ---' block after
    every later record. The file is closed first, its unwritable buffer dropped, so that closing the
    handler later (setup_logging, the end of the process) does not fail again."""

    def handleError(self, record):
        e = sys.exc_info()[1]
        if isinstance(e, OSError):
            try:
                self.close()
            except OSError:  # the buffered record cannot be flushed either; the file is closed all the same
                pass
            raise OSError(e.errno, e.strerror, self.baseFilename) from None
        super().handleError(record)


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
        fh = LogFile(log_file)
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
