"""The safe reader of torch files: a restricted unpickler that runs no code from the file (torch's zip
and legacy formats, Python 2 pickles included), and the recognition of the model layouts those files
hold (this project's and the older reproduction's). It imports nothing from the package, so that the
model, the utilities and aligned_reid.checkpoint (which builds Models from files) can all use it."""
import argparse
import os
import pickle
import types
import zipfile
from collections import OrderedDict

import torch


class CheckpointError(ValueError):
    """A file that cannot be read as, or does not fit, a model; the message names the file."""


# ----------------------------------------------------------------------------- the safe reader

# Everything a state dict, an optimizer state, our RNG states and the older files need; nothing that
# can run code or touch the system. Storage classes are resolved by torch itself before this list is
# consulted (its find_class maps '*Storage' names to dtypes), so they need no entry.
_SAFE_GLOBALS = {
    ('collections', 'OrderedDict'),
    ('builtins', 'set'), ('builtins', 'frozenset'), ('builtins', 'complex'), ('builtins', 'bytearray'),
    ('__builtin__', 'set'), ('__builtin__', 'frozenset'), ('__builtin__', 'complex'),  # Python 2 names
    ('torch._utils', '_rebuild_tensor'),      # torch <= 0.3
    ('torch._utils', '_rebuild_tensor_v2'),   # torch >= 0.4
    ('torch._utils', '_rebuild_parameter'),
    ('torch', 'Size'),
    ('argparse', 'Namespace'),  # arguments other code bases save; a plain attribute holder
    ('numpy', 'ndarray'), ('numpy', 'dtype'),
    ('numpy.core.multiarray', '_reconstruct'), ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', '_reconstruct'), ('numpy._core.multiarray', 'scalar'),
    ('_codecs', 'encode'),  # how a protocol-2 pickle written by Python 3 spells bytes
}


class _Refused(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals listed above (and torch dtypes); every other
    global (os.system, builtins.exec, any class) raises before it is imported or called."""

    def find_class(self, module, name):
        allowed = (module, name) in _SAFE_GLOBALS or (
            module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise _Refused('{}.{}'.format(module, name))
        return super().find_class(module, name)


def _restricted_load(f, **kwargs):
    return _RestrictedUnpickler(f, **kwargs).load()


# torch.load takes a `pickle_module` exposing Unpickler and load; it subclasses our Unpickler for the
# tensor data, so both the zip and the legacy format go through _RestrictedUnpickler.find_class.
_SAFE_PICKLE = types.ModuleType('aligned_reid_restricted_pickle')
_SAFE_PICKLE.Unpickler = _RestrictedUnpickler
_SAFE_PICKLE.load = _restricted_load
_SAFE_PICKLE.UnpicklingError = pickle.UnpicklingError

_MAGIC = [  # (prefix, offset, what it looks like)
    (b'\xff\xd8\xff', 0, 'a JPEG image'), (b'\x89PNG', 0, 'a PNG image'), (b'GIF8', 0, 'a GIF image'),
    (b'\x1f\x8b', 0, 'a gzip archive'), (b'BZh', 0, 'a bzip2 archive'), (b'7z\xbc\xaf', 0, 'a 7-Zip archive'),
    (b'\x89HDF', 0, 'an HDF5 file'), (b'\x93NUMPY', 0, 'a numpy .npy file'), (b'%PDF', 0, 'a PDF document'),
    (b'ustar', 257, 'a tar archive (torch < 0.1.10 wrote those; not read here)'),
    (b'<', 0, 'an HTML or XML page (a failed download?)'),
]


def _sniff(head):
    """'zip', 'pickle' or a description of what the first bytes of a file look like."""
    if head.startswith(b'PK\x03\x04') or head.startswith(b'PK\x05\x06'):
        return 'zip'
    for magic, offset, what in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return what
    if head.startswith(b'\x80') and len(head) > 1 and 2 <= head[1] <= 5:
        return 'pickle'
    if len(head) > 8 and head[8:10] == b'{"':
        return 'a safetensors file (convert it with safetensors.torch.load_file and torch.save)'
    try:
        text = head[:60].decode('utf-8')
        if text.isprintable() or text.strip():
            return 'text: {!r}'.format(text.splitlines()[0][:40] if text.splitlines() else text)
    except UnicodeDecodeError:
        pass
    return 'unknown binary data (first bytes {})'.format(head[:8].hex())


def load_file(path):
    """Reads a torch checkpoint or weight file (zip serialisation of torch >= 1.6, or the legacy
    format of torch 0.1.12 .. 1.5, Python 2 pickles included) into plain containers and CPU tensors,
    running no code from it. CUDA storages are mapped to the CPU.

    Raises FileNotFoundError, or CheckpointError (a ValueError) with one line naming the file and what
    it looks like (empty, truncated, an image, a TorchScript archive, a refused global ...)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError('checkpoint file not found: {}'.format(path))
    if os.path.getsize(path) == 0:
        raise CheckpointError('{}: empty file (0 bytes), not a checkpoint'.format(path))
    with open(path, 'rb') as f:
        head = f.read(512)
    kind = _sniff(head)
    if kind == 'zip':
        if not zipfile.is_zipfile(path):
            raise CheckpointError('{}: truncated zip archive (its central directory is missing): the file was '
                                  'cut short, e.g. by an interrupted copy or download'.format(path))
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.endswith('constants.pkl') or '/code/' in n for n in names):
            raise CheckpointError('{}: a TorchScript archive (torch.jit.save), not a checkpoint: it holds code, '
                                  'which is never loaded here'.format(path))
        if not any(n.endswith('data.pkl') for n in names):
            raise CheckpointError('{}: a zip archive but not a torch file (no data.pkl among {} members)'.format(
                path, len(names)))
    elif kind != 'pickle':
        raise CheckpointError('{}: not a torch file: looks like {}'.format(path, kind))
    try:
        return torch.load(path, map_location='cpu', pickle_module=_SAFE_PICKLE, weights_only=False,
                          encoding='latin1')
    except _Refused as e:
        hint = (' (a whole pickled module: save its state_dict() instead)' if str(e).startswith('torch.nn.')
                else '')
        raise CheckpointError(
            '{}: refused: its pickle asks for {}, which is neither a tensor, a plain container nor one of the '
            'torch globals a state dict needs; nothing from the file was run{}'.format(path, e, hint)) from None
    except (EOFError, pickle.UnpicklingError) as e:
        what = 'legacy torch file' if kind == 'pickle' else 'zip archive'
        raise CheckpointError('{}: truncated or damaged {} ({}: {})'.format(
            path, what, type(e).__name__, e or 'ran out of input')) from None
    except RuntimeError as e:
        msg = str(e)
        if 'magic number' in msg:
            raise CheckpointError('{}: a plain pickle, not a torch file (a partitions.pkl?)'.format(path)) from None
        raise CheckpointError('{}: truncated or damaged {} ({})'.format(
            path, 'zip archive' if kind == 'zip' else 'legacy torch file', msg.splitlines()[0])) from None
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError) as e:
        raise CheckpointError('{}: damaged torch file ({}: {})'.format(path, type(e).__name__, e)) from None


# ----------------------------------------------------------------------------- layouts

def _is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def _is_optimizer_state(obj):
    return isinstance(obj, dict) and 'state' in obj and 'param_groups' in obj


def describe(obj):
    """A short description of an unrecognised object, for messages."""
    if isinstance(obj, dict):
        keys = [repr(k) for k in list(obj)[:8]]
        return 'a dict with keys {}{}'.format(', '.join(keys), ' ...' if len(obj) > 8 else '')
    if isinstance(obj, (list, tuple)):
        return 'a {} of {} items'.format(type(obj).__name__, len(obj))
    return 'a {}'.format(type(obj).__name__)


def _saved_args(args):
    """Saved arguments as a dict: ours are a dict; other code bases pickle an argparse.Namespace."""
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return dict(args) if isinstance(args, dict) else {}


def _pick(models, model_index, path, what):
    if not 1 <= model_index <= len(models):
        raise CheckpointError('{}: {} holds {} model(s); --model_index {} is out of range (1..{})'.format(
            path, what, len(models), model_index, len(models)))
    return models[model_index - 1]


def recognise(obj, path, model_index=1):
    """(model state dict as in the file, saved train.py arguments or {}, layout description, epoch or
    None, whether it comes from the older reproduction) for every layout read here:
    train.py / train_ml.py checkpoints ('model', 'models'), the older reproduction's ckpt.pth
    (state_dicts=[model(s)..., optimizer(s)...], ep, scores), a dict holding 'state_dict', or a plain
    state dict. model_index (1-based) picks a model of a mutual-learning checkpoint."""
    if isinstance(obj, dict) and _is_state_dict(obj.get('model')):
        args = _saved_args(obj.get('args'))
        epoch = obj.get('epoch')
        if isinstance(obj.get('models'), list) and obj['models']:
            n = len(obj['models'])
            sd = _pick(obj['models'], model_index, path, 'this train_ml.py checkpoint')
            layout = 'train_ml.py checkpoint, model {} of {} (epoch {})'.format(model_index, n, epoch)
        else:
            sd = _pick([obj['model']], model_index, path, 'this train.py checkpoint')
            layout = 'train.py checkpoint (epoch {})'.format(epoch)
        return sd, args, layout, epoch, False
    if isinstance(obj, dict) and isinstance(obj.get('state_dicts'), (list, tuple)):
        sds = list(obj['state_dicts'])
        models = [sd for sd in sds if _is_state_dict(sd)]
        optims = [sd for sd in sds if _is_optimizer_state(sd)]
        in_order = all(_is_state_dict(sd) for sd in sds[:len(models)])  # models first, then optimizers
        if not models or len(models) + len(optims) != len(sds) or not in_order:
            raise CheckpointError('{}: a dict with state_dicts, but its {} entries are not model state dicts '
                                  'followed by optimizer states'.format(path, len(sds)))
        epoch = obj.get('ep')
        kind = ('mutual learning, {} models + {} optimizers'.format(len(models), len(optims))
                if len(models) > 1 else 'model + optimizer' if optims else 'model')
        sd = _pick(models, model_index, path, "the older reproduction's ckpt.pth")
        layout = "the older reproduction's ckpt.pth ({}; model {}; epoch {})".format(kind, model_index, epoch)
        return sd, {}, layout, epoch, True
    if model_index != 1:
        raise CheckpointError('{}: holds one model; --model_index {} is out of range (1..1)'.format(
            path, model_index))
    if isinstance(obj, dict) and _is_state_dict(obj.get('state_dict')):
        return obj['state_dict'], _saved_args(obj.get('args')), "checkpoint dict holding 'state_dict'", None, False
    if _is_state_dict(obj):
        return obj, {}, 'plain state dict', None, False
    raise CheckpointError("{}: not a model checkpoint: {} (expected a state dict of tensors, a train.py "
                          "checkpoint holding 'model', or the older reproduction's dict holding "
                          "'state_dicts')".format(path, describe(obj)))


def convert_state(sd):
    """Our Model's key names from any layout: 'module.' prefixes (DataParallel / DDP) stripped, the
    older reproduction's 'fc.*' classifier renamed 'classifier.*', and its local_conv bias folded into
    local_bn: in eval mode BN(conv(x) + b) = gamma (conv(x) + b - mean) / sqrt(var + eps) + beta, which is
    BN(conv(x)) with running mean (mean - b); in training mode the batch mean absorbs b, so the bias never
    mattered there. Returns (state dict, list of the conversions made)."""
    out, notes = OrderedDict(), []
    for k, v in sd.items():
        while k.startswith('module.'):
            k = k[len('module.'):]
            if "'module.' prefixes stripped" not in notes:
                notes.append("'module.' prefixes stripped")
        if k.startswith('fc.'):
            k = 'classifier.' + k[len('fc.'):]
            if "'fc.*' classifier read as 'classifier.*'" not in notes:
                notes.append("'fc.*' classifier read as 'classifier.*'")
        if k in out:
            raise CheckpointError('key {!r} appears twice once prefixes are stripped'.format(k))
        out[k] = v
    bias = out.get('local_conv.bias')
    if bias is not None and 'local_bn.running_mean' in out:
        mean = out['local_bn.running_mean']
        if bias.shape == mean.shape:
            out['local_bn.running_mean'] = (mean.double() - bias.double()).to(mean.dtype)
            del out['local_conv.bias']
            notes.append('local_conv.bias folded into local_bn.running_mean')
    return out, notes


def _keys(keys, n=6):
    keys = sorted(keys)
    return ', '.join(keys[:n]) + (' ... ({} in all)'.format(len(keys)) if len(keys) > n else '')


def backbone_state(path):
    """The ResNet backbone weights (torchvision key names, no 'fc.*') of any file: a torchvision ResNet
    state dict, or any whole-model layout read_checkpoint recognises (its 'base.*' keys)."""
    sd, _, layout, _, _ = recognise(load_file(path), path)
    state, _ = convert_state(sd)
    if any(k.startswith('base.') for k in state):
        other = [k for k in state if not k.startswith(('base.', 'local_', 'classifier.'))]
        if other:
            raise CheckpointError('{} ({}): keys outside the model: {}'.format(path, layout, _keys(other)))
        return OrderedDict((k[len('base.'):], v) for k, v in state.items() if k.startswith('base.')), layout
    return OrderedDict((k, v) for k, v in state.items() if not k.startswith('classifier.')), layout
