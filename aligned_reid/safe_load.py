"""The safe reader of torch files: a restricted unpickler that runs no code from the file (torch's zip
and legacy formats, Python 2 pickles included). What the files hold is recognised by
aligned_reid.checkpoint."""
import os
import pickle
import types
import zipfile

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
