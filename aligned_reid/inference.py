"""Using a trained model on one's own images: FeatureExtractor (checkpoint -> features of PIL
images or image files), listing image files, and extraction into the features file of
aligned_reid.features_file."""
import ctypes
import functools
import hashlib
import os
import signal
import sys


import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import data
from .checkpoint import CKPT_NAME, load_model
from .evaluation import forward_features
from .signals import started


def resolve_checkpoint(path):
    """A checkpoint file, or an experiment folder holding train.py's ckpt.pth -> the file."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        ckpt = os.path.join(path, CKPT_NAME)
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"{path}: an experiment folder without {CKPT_NAME}")
        return ckpt
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return path


def weights_digest(model):
    """sha256 (hex) of a model's state dict (names, dtypes, shapes, values): the same weights give
    the same digest wherever the file was moved or whatever layout it was saved in."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f'{name} {t.dtype} {tuple(t.shape)}\0'.encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return h.hexdigest()


class FeatureExtractor:
    """Global (and local) features of images with a trained AlignedReID model.

    FeatureExtractor(path) loads a train.py / train_ml.py checkpoint, a bare state dict, or
    the ckpt.pth of an experiment folder (aligned_reid.checkpoint.load_model; `overrides`
    sets the model settings a bare state dict lacks, `model_index` picks a mutual-learning
    model). Images are resized to the checkpoint's resize_h_w and normalised as in test.py.

        extractor = FeatureExtractor('exp/train/market1501', device='cpu')
        feats = extractor(['a.jpg', 'b.jpg'], local=True)   # 'global' [2, C], 'local' [2, h, c]

    cfg holds the resolved settings (see load_model), including normalize_feature, which the
    distances should use."""

    def __init__(self, path, device='cpu', batch_size=64, flip=False, amp=False,
                 overrides=None, model_index=1):
        self.path = resolve_checkpoint(path)
        model, cfg = load_model(self.path, device=device, overrides=overrides,
                                model_index=model_index)
        self.model_index = model_index
        self._setup(model, cfg, device, batch_size, flip, amp)

    @classmethod
    def from_model(cls, model, resize_h_w=(256, 128), normalize_feature=False, device='cpu',
                   batch_size=64, flip=False, amp=False):
        """An extractor around an already built Model (for example one still in training)."""
        self = cls.__new__(cls)
        self.path, self.model_index = None, 1
        cfg = {'resize_h_w': list(resize_h_w), 'normalize_feature': normalize_feature,
               'mean': list(data.IMAGENET_MEAN), 'std': list(data.IMAGENET_STD)}
        self._setup(model.to(device).eval(), cfg, device, batch_size, flip, amp)
        return self

    def _setup(self, model, cfg, device, batch_size, flip, amp):
        if batch_size < 1:
            raise ValueError(f"FeatureExtractor: batch_size must be >= 1, got {batch_size}")
        self.model, self.cfg = model, cfg
        self.device = torch.device(device)
        self.batch_size, self.flip = batch_size, flip
        self.amp = amp and self.device.type == 'cuda'      # autocast on the CPU is bfloat16
        self.transform = data.build_transform(tuple(cfg['resize_h_w']), train=False,
                                              mean=cfg['mean'], std=cfg['std'])

    def settings(self, local):
        """What a features file records about how its features were made (JSON-able): the model
        file, its weights' digest and settings (cfg), flip, amp, local."""
        if getattr(self, '_weights', None) is None:
            self._weights = weights_digest(self.model)
        return {'model': os.path.abspath(self.path) if self.path else None,
                'model_index': self.model_index, 'weights': self._weights,
                'flip': self.flip, 'local': local, 'amp': self.amp, 'cfg': dict(self.cfg)}

    def preprocess(self, image):
        """A path or PIL image -> the normalised tensor [3, H, W] the model takes. A file that
        cannot be read raises ValueError naming it."""
        if isinstance(image, (str, os.PathLike)):
            try:
                image = data.load_image(image)
            except data.UnreadableImageError as e:
                raise ValueError(f"FeatureExtractor: {e}") from None
        elif isinstance(image, Image.Image):
            image = image.convert('RGB')
        else:
            raise ValueError(f"FeatureExtractor: expected a path or a PIL image, got "
                             f"{type(image).__name__}")
        return self.transform(image)

    def embed(self, batch, local=True):
        """A preprocessed batch [B, 3, H, W] -> dict of float32 tensors on the device."""
        self.model.eval()
        keys = ('global', 'local') if local else ('global',)
        with torch.inference_mode():
            return forward_features(self.model, batch.to(self.device, non_blocking=True),
                                    flip=self.flip, amp=self.amp, keys=keys)

    def dims(self, local):
        """Feature shapes without the batch axis: {'global': (C,), 'local': (h, c)}."""
        h, w = self.cfg['resize_h_w']
        return {k: tuple(v.shape[1:]) for k, v in
                self.embed(torch.zeros(1, 3, h, w), local=local).items()}

    def __call__(self, images, local=False, as_numpy=True):
        """Features of one image or a list of images (paths or PIL images).

        Returns a dict: 'global' [N, C] and, with local=True, 'local' [N, h, c]; float32 numpy
        arrays (as_numpy=True) or torch tensors on the extractor's device. N = 1 for a single
        image. Images go through the model batch_size at a time."""
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        images = list(images)
        parts = []
        for s in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[s:s + self.batch_size]])
            parts.append(self.embed(batch, local=local))
        if parts:
            out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        else:
            h, w = self.cfg['resize_h_w']
            out = {k: v[:0] for k, v in self.embed(torch.zeros(1, 3, h, w), local=local).items()}
        return {k: v.cpu().numpy() for k, v in out.items()} if as_numpy else out

    def batches(self, paths, local=False, workers=0):
        """Features of image files decoded by `workers` loader processes (which die with this
        process), batch by batch: yields (number of inputs consumed, kept paths, dict 'global'
        [K, C] / 'local' [K, h, c] numpy, skipped: list of (path, error)). A file that cannot be
        decoded is skipped, not fatal."""
        h, w = self.cfg['resize_h_w']
        loader = DataLoader(ImageFiles(paths, self.transform, (h, w)), batch_size=self.batch_size,
                            num_workers=workers, pin_memory=self.device.type == 'cuda',
                            worker_init_fn=functools.partial(die_with_parent, os.getpid()))
        dims = None
        for images, indices, errors in started(loader):
            good = [j for j, e in enumerate(errors) if not e]
            if good:
                feats = {k: v.cpu().numpy() for k, v in self.embed(images[good], local=local).items()}
                dims = {k: v.shape[1:] for k, v in feats.items()}
            else:
                dims = dims or self.dims(local)
                feats = {k: np.zeros((0,) + tuple(d), np.float32) for k, d in dims.items()}
            idx = indices.tolist()
            yield (len(idx), [paths[idx[j]] for j in good],
                   feats, [(paths[i], e) for i, e in zip(idx, errors) if e])

    def extract_files(self, paths, local=False, workers=0, progress=False):
        """Features of image files decoded by `workers` loader processes; unreadable files are
        skipped, not fatal. Returns (kept paths, dict 'global' [K, C] / 'local' [K, h, c] numpy,
        skipped: list of (path, error))."""
        from tqdm import tqdm
        paths = list(paths)
        kept, skipped, parts = [], [], []
        with tqdm(total=len(paths), desc='extract', disable=not progress, leave=False) as bar:
            for n, good, feats, bad in self.batches(paths, local=local, workers=workers):
                kept += good
                skipped += bad
                parts.append(feats)
                bar.update(n)
        if parts:
            return kept, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, skipped
        return kept, self([], local=local), skipped


# ----------------------------------------------------------------------------- image files

def list_images(images=None, partitions=None, split='test'):
    """The image paths to extract, in a fixed order: a folder's files (recursively, sorted by
    relative path, hidden files left out), a text file's lines (blank lines and '#' comments
    left out), or the split of a partitions.pkl joined to its images/ folder."""
    if partitions is not None:
        parts = data.read_partitions(partitions)
        key = f'{split}_im_names'
        if key not in parts:
            raise ValueError('{}: no {} split (keys: {})'.format(partitions, split, ', '.join(sorted(parts))))
        im_dir = data.partitions_images_dir(partitions)
        return [os.path.join(im_dir, n) for n in parts[key]]
    if os.path.isdir(images):
        found = []
        for root, dirs, files in os.walk(images):
            dirs[:] = [d for d in dirs if not d.startswith('.')]
            found += [os.path.join(root, f) for f in files if not f.startswith('.')]
        return sorted(found, key=lambda f: os.path.relpath(f, images))
    base = os.path.dirname(os.path.abspath(images))
    with open(images, encoding='utf-8') as f:
        lines = [line.strip() for line in f]
    return [line if os.path.isabs(line) else os.path.join(base, line)
            for line in lines if line and not line.startswith('#')]


class ImageFiles(Dataset):
    """(image [3, H, W], index, error message or '') per path; a file that cannot be decoded gives a
    zero image and its error instead of stopping the loader."""

    def __init__(self, paths, transform, size):
        self.paths, self.transform, self.size = paths, transform, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.transform(data.load_image(self.paths[i])), i, ''
        except data.UnreadableImageError as e:
            error = str(e)
        # Any other decoder failure (an odd mode, a codec bug) concerns this one file only: it is
        # reported, and the extraction goes on.
        except Exception as e:  # noqa: BLE001
            error = 'cannot read image {}: {}: {}'.format(self.paths[i], type(e).__name__, e)
        return torch.zeros(3, *self.size), i, error


def die_with_parent(parent_pid, worker_id=None):
    """DataLoader worker_init_fn: the worker is killed when the process that started it dies, even by
    SIGKILL (Linux: PR_SET_PDEATHSIG), instead of living on as an orphan holding its files."""
    if sys.platform.startswith('linux'):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)   # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:            # the parent died before the call above
        os._exit(1)


def extract_to_file(extractor, paths, writer, local=False, workers=0, chunk_size=1024, max_images=None,
                    progress=True, logger=None):
    """Runs the extractor over paths[writer.position:] and commits every chunk_size inputs; assembles
    the file when every input is done. Returns the number of inputs handled in this call."""
    from tqdm import tqdm
    start = writer.position
    stop = len(paths) if max_images is None else min(len(paths), start + max_images)
    chunk = {'paths': [], 'feats': [], 'skipped': [], 'errors': []}
    position = start
    with tqdm(total=len(paths), initial=start, desc='extract', unit='img', disable=not progress) as bar:
        for n, good, feats, bad in extractor.batches(paths[start:stop], local=local, workers=workers):
            for _, error in bad:
                if logger:
                    logger.warning('skipped: %s', error)
            chunk['paths'] += good
            chunk['feats'].append(feats)
            chunk['skipped'] += [p for p, _ in bad]
            chunk['errors'] += [e for _, e in bad]
            position += n
            bar.update(n)
            if position - writer.position >= chunk_size or position == stop:
                writer.commit(position, chunk['paths'],
                              {k: np.concatenate([f[k] for f in chunk['feats']]) for k in chunk['feats'][0]},
                              chunk['skipped'], chunk['errors'])
                chunk = {'paths': [], 'feats': [], 'skipped': [], 'errors': []}
    if writer.position == len(paths):
        writer.finish()
    return position - start
