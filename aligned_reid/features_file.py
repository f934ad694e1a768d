"""The HDF5 features file of script/extract.py: its definition, the resumable writer (chunks committed
atomically, the file assembled last) and the reader side by side, and the model settings it records
(what tells two files' models apart)."""
import hashlib
import io
import json
import os
import re
import shutil

try:
    import fcntl
except ImportError:             # not on Windows: there two runs on one output are not kept apart
    fcntl = None

import h5py
import numpy as np

from aligned_reid.files import atomic_write, fsync_dir


# ----------------------------------------------------------------------------- the features file

# A features file is one HDF5 file, which exists only once it is complete:
#   datasets  'paths' [N] (str), 'global' [N, C], with local features 'local' [N, h, c] (float32,
#             one row per extracted image, in input order), 'skipped' [S], 'skipped_errors' [S]
#             (str: the inputs that could not be decoded, and why)
#   attrs     'format' (FEATURES_FORMAT), 'settings' (JSON: FeatureExtractor.settings), 'input_digest'
#             (input_digest of the ordered inputs), 'num_inputs', 'rows' (N), 'num_skipped' (S),
#             'complete' (True)
# Until then the rows live in the folder <file>.unfinished: 'header.json' (format, settings,
# input_digest, num_inputs, dims) and one '<start>-<stop>.npz' per chunk of inputs [start, stop),
# each written whole and then renamed into place. A kill at any instruction leaves complete chunks
# and at most a temporary file, which the next run removes; the file itself is assembled from the
# chunks into a temporary file and renamed over <file> last.
FEATURES_FORMAT = 'aligned_reid features 2'
READABLE_FORMATS = (FEATURES_FORMAT, 'aligned_reid features 1')   # 1: the same, written in place
UNFINISHED = '.unfinished'
_CHUNK = re.compile(r'^(\d{12})-(\d{12})\.npz$')


class FeaturesWriteError(OSError):
    """A features file (or its unfinished folder) could not be written; the message names the file."""


def input_digest(paths):
    """sha256 of the ordered input list: a resumed run must see the same images in the same order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode('utf-8', 'surrogateescape') + b'\0')
    return h.hexdigest()


def unfinished_dir(path):
    """The folder holding the chunks of an unfinished extraction into `path`."""
    return os.fspath(path) + UNFINISHED


def decode_text(values):
    """h5py strings (bytes or str) -> list of str."""
    return [v.decode('utf-8') if isinstance(v, bytes) else v for v in values]


def _inspect(path):
    """(attrs dict, None) of a finished features file at `path`, or (None, why it is not one)."""
    if os.path.isdir(path):
        return None, 'a folder'
    if not h5py.is_hdf5(path):
        with open(path, 'rb') as f:
            head = f.read(4)
        kinds = {b'\xff\xd8\xff': 'a JPEG image', b'\x89PNG': 'a PNG image', b'GIF8': 'a GIF image'}
        kind = next((v for k, v in kinds.items() if head.startswith(k)), 'not an HDF5 file')
        return None, kind if head else 'an empty file'
    try:
        with h5py.File(path, 'r', locking=False) as f:
            attrs = dict(f.attrs)
            missing = [k for k in ('paths', 'global') if k not in f]
    except Exception as e:  # noqa: BLE001  (h5py raises OSError, RuntimeError, KeyError on damage)
        return None, 'a damaged HDF5 file ({})'.format(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if attrs.get('format') not in READABLE_FORMATS:
        return None, 'an HDF5 file that extract.py did not write'
    if not attrs.get('complete') or missing:
        return None, 'an unfinished features file of an older extract.py, which cannot be continued safely'
    return attrs, None


ARCHITECTURE = ('base_model', 'last_stride', 'local_conv_out_channels', 'resize_h_w')


def describe_model(settings, dims):
    """'resnet50, global 2048, local 8 x 128, weights 3f2a9c01b7de' from a features file's settings and
    the feature shapes {'global': (C,), 'local': (h, c)}, for messages."""
    cfg = settings.get('cfg') or {}
    parts = [str(cfg.get('base_model', 'model unknown')), 'global {}'.format(' x '.join(map(str, dims['global'])))]
    if 'local' in dims:
        parts.append('local {}'.format(' x '.join(map(str, dims['local']))))
    if settings.get('weights'):
        parts.append('weights {}'.format(settings['weights'][:12]))
    return ', '.join(parts)


def model_difference(settings_a, dims_a, settings_b, dims_b):
    """None when two sets of features may be compared; else what tells their models apart: the feature
    shapes (dims: {'global': (C,), 'local': (h, c)}), the weights (where both settings record their
    digest), or else the architecture settings."""
    for key in ('global', 'local'):
        if key in dims_a and key in dims_b and tuple(dims_a[key]) != tuple(dims_b[key]):
            return '{} features of {} and {}'.format(key, ' x '.join(map(str, dims_a[key])),
                                                    ' x '.join(map(str, dims_b[key])))
    if settings_a.get('weights') and settings_b.get('weights'):
        return None if settings_a['weights'] == settings_b['weights'] else 'other weights'
    cfg_a, cfg_b = settings_a.get('cfg') or {}, settings_b.get('cfg') or {}
    changed = [k for k in ARCHITECTURE if k in cfg_a and k in cfg_b and cfg_a[k] != cfg_b[k]]
    return 'other {}'.format(', '.join(changed)) if changed else None


def open_features(path):
    """Opens a features file written by script/extract.py (read-only h5py.File; close it): see the
    definition above. Raises ValueError naming the file if it is not one, or is unfinished."""
    path = os.fspath(path)
    if not os.path.exists(path):
        if os.path.isdir(unfinished_dir(path)):
            raise ValueError(f"{path}: the extraction is unfinished (its chunks are in "
                             f"{unfinished_dir(path)}; rerun extract.py to complete it)")
        raise FileNotFoundError(f"features file not found: {path}")
    attrs, problem = _inspect(path)
    if problem:
        raise ValueError(f"{path}: not a features file of script/extract.py: {problem}")
    return h5py.File(path, 'r')


def read_features(path, local=False):
    """A features file of script/extract.py in memory -> dict 'paths' (list of str), 'global'
    np.float32 [N, C], 'local' [N, h, c] (local=True), 'settings' (dict), 'skipped' (list)."""
    with open_features(path) as f:
        if local and 'local' not in f:
            raise ValueError(f"{path}: has no local features (extract with --local)")
        out = {'paths': decode_text(f['paths'][:]), 'global': f['global'][:],
               'settings': json.loads(f.attrs['settings']), 'skipped': decode_text(f['skipped'][:])}
        if local:
            out['local'] = f['local'][:]
    return out


def _free_bytes(folder):
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


class _CheckedFile(io.RawIOBase):
    """An unbuffered file for h5py's file-object driver that remembers the first write error and lets
    HDF5 carry on as if the write had succeeded: HDF5 then closes cleanly (a write failing inside
    HDF5 leaves it unable to close, and the process crashes at exit) and the caller discards the file."""

    def __init__(self, f):
        super().__init__()
        self.f, self.error = f, None

    def readable(self):
        return True

    def writable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, b):
        return self.f.readinto(b)

    def seek(self, pos, whence=0):
        return self.f.seek(pos, whence)

    def tell(self):
        return self.f.tell()

    def _guard(self, fn, *args):
        if self.error is None:
            try:
                fn(*args)
            except OSError as e:
                self.error = e

    def write(self, b):
        view = memoryview(b).cast('B')
        done = [0]

        def write_all():                     # an unbuffered file may write part of it
            while done[0] < len(view):
                done[0] += self.f.write(view[done[0]:])
        self._guard(write_all)
        return len(view)

    def truncate(self, size=None):
        self._guard(self.f.truncate, size)
        return size

    def flush(self):
        self._guard(self.f.flush)


class FeaturesWriter:
    """Writes the features file `path` of the ordered inputs `paths`, chunk by chunk, resumably.

    settings: JSON-able dict (FeatureExtractor.settings); dims: feature shapes without the batch
    axis, {'global': (C,), 'local': (h, c)}. Starts afresh (overwrite=True), continues an unfinished
    extraction of the same inputs and settings, finds `path` complete already (.complete), or raises
    ValueError saying why it refuses (other settings, other images, a file that is not a features
    file). .position: the inputs done. Use as a context manager (it holds a lock on the folder)."""

    def __init__(self, path, paths, settings, dims, overwrite=False):
        self.path, self.dir = os.fspath(path), unfinished_dir(path)
        self.header = {'format': FEATURES_FORMAT, 'settings': settings, 'input_digest': input_digest(paths),
                       'num_inputs': len(paths), 'dims': {k: list(v) for k, v in dims.items()}}
        self.position, self.chunks, self.complete, self._lock = 0, [], False, None
        self.rows = self.num_skipped = None        # set by finish()
        attrs, problem = _inspect(self.path) if os.path.exists(self.path) else (None, None)
        old = self._read_header()
        if not overwrite:
            if attrs is not None and self._differences(attrs) == []:
                self.complete = True
                if os.path.isdir(self.dir) and (old is None or self._differences(old) == []):
                    self._with_lock(lambda: shutil.rmtree(self.dir))
                return
            if old is not None and self._differences(old) == []:
                self._with_lock(self._scan)
                return
            if problem:
                raise ValueError(f'{self.path}: exists and is {problem}; pass --overwrite to replace it, '
                                 'or choose another --output')
            for found, where in ((attrs, self.path), (old, self.dir)):
                if found is not None:
                    changed = self._differences(found)
                    raise ValueError('{}: holds an extraction of other {}; pass --overwrite to start again'.format(
                        where, 'settings ({})'.format(', '.join(changed)) if changed != ['images'] else 'images'))
        self._with_lock(self._start)

    # -- the folder
    def _read_header(self):
        try:
            with open(os.path.join(self.dir, 'header.json'), encoding='utf-8') as f:
                return json.load(f)
        except (OSError, ValueError):           # none yet, or killed before it was renamed into place
            return None

    def _differences(self, found):
        """[] when `found` (attrs of a file, or a header) is an extraction of the same inputs and settings;
        else the names of the settings that differ, or ['images']."""
        settings = found['settings']
        settings = json.loads(settings) if isinstance(settings, str) else settings
        changed = [k for k in self.header['settings'] if settings.get(k) != self.header['settings'][k]]
        if changed:
            return changed
        same = (found.get('input_digest') == self.header['input_digest']
                and int(found.get('num_inputs', -1)) == self.header['num_inputs'])
        return [] if same else ['images']

    def _with_lock(self, action):
        self._io(os.makedirs, self.dir, exist_ok=True)
        fd = self._io(os.open, os.path.join(self.dir, 'lock'), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)     # a POSIX lock: not inherited by workers
        except OSError:
            os.close(fd)
            raise ValueError(f'{self.dir}: another extract.py is writing it; wait for it or stop it') from None
        self._lock = fd
        action()

    def _start(self):
        # The header goes first: a kill halfway through leaves chunks that no header vouches for.
        for name in sorted(os.listdir(self.dir), key=lambda n: n != 'header.json'):
            if name != 'lock':
                self._io(os.remove, os.path.join(self.dir, name))
        self._atomic_write('header.json', lambda f: f.write(json.dumps(self.header, indent=1).encode()))

    def _scan(self):
        """Keeps the chunks that continue each other from input 0; anything else (a temporary file of a
        killed write, a stray chunk) is removed."""
        found = sorted((int(m.group(1)), int(m.group(2)), n) for n in os.listdir(self.dir)
                       for m in [_CHUNK.match(n)] if m)
        keep = set()
        for start, stop, name in found:
            if start == self.position and self.position < stop <= self.header['num_inputs']:
                self.chunks.append(name)
                keep.add(name)
                self.position = stop
        for name in os.listdir(self.dir):
            if name not in keep and name not in ('header.json', 'lock'):
                self._io(os.remove, os.path.join(self.dir, name))

    def close(self):
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- writing
    def _io(self, fn, *args, **kwargs):
        """fn(*args) with an OSError turned into one line naming the file and what is kept."""
        try:
            return fn(*args, **kwargs)
        except PermissionError:
            raise
        except OSError as e:
            raise FeaturesWriteError('{}: cannot write {} ({}); {}'.format(
                self.path, e.filename or self.dir, e.strerror or e, self._kept())) from None

    def _kept(self):
        if self.position:
            return (f'the features of the first {self.position} of {self.header["num_inputs"]} inputs are kept '
                    f'in {self.dir}: free space or fix the folder and rerun the same command to continue')
        return 'nothing was kept'

    def _atomic_write(self, name, write):
        """Writes self.dir/name whole (files.atomic_write)."""
        path = os.path.join(self.dir, name)
        try:
            with atomic_write(path) as f:
                write(f)
        except OSError as e:
            e.filename = e.filename or path      # a failed flush names no file
            raise

    def commit(self, stop, paths, feats, skipped, errors):
        """Stores the inputs [position, stop): the kept `paths` [K] with feats 'global' [K, C] (and
        'local' [K, h, c]), the `skipped` inputs [S] with their `errors` [S]; then position = stop."""
        if not self.position < stop <= self.header['num_inputs']:
            raise ValueError(f'commit: inputs [{self.position}, {stop}) of {self.header["num_inputs"]}')
        arrays = {'paths': np.array(paths, dtype=str), 'skipped': np.array(skipped, dtype=str),
                  'skipped_errors': np.array(errors, dtype=str)}
        for k, d in self.header['dims'].items():
            arrays[k] = np.asarray(feats[k], dtype=np.float32).reshape((len(paths),) + tuple(d))
        name = f'{self.position:012d}-{stop:012d}.npz'
        self._io(self._atomic_write, name, lambda f: np.savez(f, **arrays))
        self.chunks.append(name)
        self.position = stop

    def _chunk(self, name, keys=None):
        """The arrays `keys` (all by default) of a chunk. A chunk damaged from outside (the writer never
        leaves one) is removed with those after it, so that the rerun redoes them."""
        try:
            with np.load(os.path.join(self.dir, name), allow_pickle=False) as z:
                return {k: z[k] for k in (keys or z.files)}
        except Exception as e:  # noqa: BLE001  (a zip, pickle, key or value error)
            at = self.chunks.index(name)
            for later in self.chunks[at:]:
                os.remove(os.path.join(self.dir, later))
            self.chunks, self.position = self.chunks[:at], int(_CHUNK.match(name).group(1))
            raise ValueError(f'{self.dir}: chunk {name} is damaged ({e}); it and the chunks after it are '
                             'removed: rerun the same command to redo them') from None

    def finish(self):
        """Assembles the features file from the chunks once every input is done (into a temporary file,
        renamed over `path` last), then removes the folder. Returns (rows, skipped)."""
        if self.position != self.header['num_inputs']:
            raise ValueError(f'finish: {self.position} of {self.header["num_inputs"]} inputs done')
        rows = skipped = text_bytes = 0
        for name in list(self.chunks):
            texts = list(self._chunk(name, ('paths', 'skipped', 'skipped_errors')).values())
            rows, skipped = rows + len(texts[0]), skipped + len(texts[1])
            text_bytes += sum((t.dtype.itemsize // 4 + 48) * len(t) for t in texts)   # longest x count
        # The file's size, about (vlen strings: heap entry and reference), checked first so that a full disk
        # is usually found before HDF5 writes; past this check a failed write is caught by _CheckedFile.
        need = rows * 4 * sum(int(np.prod(d)) for d in self.header['dims'].values()) + text_bytes + (64 << 10)
        free = _free_bytes(self.dir)
        if free < need:
            raise FeaturesWriteError('{}: cannot write it (about {:,} bytes are needed, {:,} are free); {}'.format(
                self.path, need, free, self._kept()))
        tmp = os.path.join(self.dir, 'features.h5.tmp')
        raw = self._io(open, tmp, 'w+b', buffering=0)   # no buffer: a write fails in write(), not in a seek
        checked = _CheckedFile(raw)
        try:
            try:
                self._assemble(checked, rows, skipped)
            except Exception:                # HDF5 trips over a write that _CheckedFile let "succeed"
                if checked.error is None:
                    raise
            checked._guard(os.fsync, raw.fileno())
        except BaseException:
            raw.close()
            os.remove(tmp)
            raise
        raw.close()
        if checked.error is not None:
            os.remove(tmp)
            e = checked.error
            raise FeaturesWriteError('{}: cannot write it ({}); {}'.format(
                self.path, e.strerror or e, self._kept()))
        self._io(os.replace, tmp, self.path)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        self.complete, self.rows, self.num_skipped = True, rows, skipped
        shutil.rmtree(self.dir, ignore_errors=True)
        return rows, skipped

    def _assemble(self, fileobj, rows, skipped):
        text = h5py.string_dtype('utf-8')
        with h5py.File(fileobj, 'w') as f:
            out = {'paths': f.create_dataset('paths', (rows,), dtype=text),
                   'skipped': f.create_dataset('skipped', (skipped,), dtype=text),
                   'skipped_errors': f.create_dataset('skipped_errors', (skipped,), dtype=text)}
            for k, d in self.header['dims'].items():
                out[k] = f.create_dataset(k, (rows,) + tuple(d), dtype='float32')
            at = {'paths': 0, 'skipped': 0}
            for name in self.chunks:
                chunk = self._chunk(name)
                for k, dset in out.items():
                    axis = 'skipped' if k.startswith('skipped') else 'paths'
                    n = len(chunk[k])
                    if n:
                        dset[at[axis]:at[axis] + n] = chunk[k].tolist() if dset.dtype == text else chunk[k]
                at['paths'] += len(chunk['paths'])
                at['skipped'] += len(chunk['skipped'])
            f.attrs.update({'format': FEATURES_FORMAT, 'settings': json.dumps(self.header['settings']),
                            'input_digest': self.header['input_digest'],
                            'num_inputs': self.header['num_inputs'], 'rows': rows, 'num_skipped': skipped,
                            'complete': True})
