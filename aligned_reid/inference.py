"""Using a trained model on one's own images: FeatureExtractor (checkpoint -> features of PIL
images or image files), listing and decoding image files, and reading script/extract.py's
HDF5 features files."""
import json
import os

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import data
from .checkpoint import load_model

CHECKPOINT_NAME = 'ckpt.pth'   # what train.py writes in its experiment folder
FEATURES_FORMAT = 'aligned_reid features 1'   # the 'format' attribute of script/extract.py's files


def resolve_checkpoint(path):
    """A checkpoint file, or an experiment folder holding train.py's ckpt.pth -> the file."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        ckpt = os.path.join(path, CHECKPOINT_NAME)
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"{path}: an experiment folder without {CHECKPOINT_NAME}")
        return ckpt
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return path


def load_image(path):
    """RGB PIL image of a file; the file is closed before returning. Raises what Pillow raises
    (OSError for an unreadable or non-image file)."""
    with Image.open(path) as im:
        return im.convert('RGB')


def forward_features(model, images, flip=False, amp=False, local=True):
    """Features of a batch images [B, 3, H, W] (on the model's device) -> dict of float32
    tensors 'global' [B, C] and, with local=True, 'local' [B, h, c]. flip=True averages in the
    features of the mirrored batch (rows stay in place, so stripes keep their meaning); amp=True
    runs under autocast on the images' device type. Call under torch.inference_mode()."""
    keys = ('global', 'local') if local else ('global',)
    with torch.autocast(device_type=images.device.type, enabled=amp):
        out = model(images)
        out_flip = model(torch.flip(images, dims=[3])) if flip else None
    feats = {}
    for key in keys:
        f = out[key].float()
        if flip:
            f = (f + out_flip[key].float()) / 2.
        feats[key] = f
    return feats


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
        self._setup(model, cfg, device, batch_size, flip, amp)

    @classmethod
    def from_model(cls, model, resize_h_w=(256, 128), normalize_feature=False, device='cpu',
                   batch_size=64, flip=False, amp=False):
        """An extractor around an already built Model (for example one still in training)."""
        self = cls.__new__(cls)
        self.path = None
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

    def preprocess(self, image):
        """A path or PIL image -> the normalised tensor [3, H, W] the model takes. A file that
        cannot be read raises ValueError naming it."""
        if isinstance(image, (str, os.PathLike)):
            try:
                image = load_image(image)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise ValueError(f"FeatureExtractor: cannot read image {os.fspath(image)}: "
                                 f"{e}") from e
        elif isinstance(image, Image.Image):
            image = image.convert('RGB')
        else:
            raise ValueError(f"FeatureExtractor: expected a path or a PIL image, got "
                             f"{type(image).__name__}")
        return self.transform(image)

    def embed(self, batch, local=True):
        """A preprocessed batch [B, 3, H, W] -> dict of float32 tensors on the device."""
        self.model.eval()
        with torch.inference_mode():
            return forward_features(self.model, batch.to(self.device, non_blocking=True),
                                    flip=self.flip, amp=self.amp, local=local)

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
        keys = ('global', 'local') if local else ('global',)
        if parts:
            out = {k: torch.cat([p[k] for p in parts]) for k in keys}
        else:
            h, w = self.cfg['resize_h_w']
            probe = self.embed(torch.zeros(1, 3, h, w), local=local)
            out = {k: v[:0] for k, v in probe.items()}
        return {k: v.cpu().numpy() for k, v in out.items()} if as_numpy else out

    def extract_files(self, paths, local=False, workers=0, progress=False):
        """Features of image files decoded by `workers` loader processes; unreadable files are
        skipped, not fatal. Returns (kept paths, dict 'global' [K, C] / 'local' [K, h, c] numpy,
        skipped: list of (path, error))."""
        from tqdm import tqdm
        h, w = self.cfg['resize_h_w']
        loader = DataLoader(ImageFiles(list(paths), self.transform, (h, w)),
                            batch_size=self.batch_size, num_workers=workers,
                            pin_memory=self.device.type == 'cuda')
        kept, skipped, parts = [], [], []
        for images, indices, errors in tqdm(loader, desc='extract', disable=not progress,
                                            leave=False):
            good = [j for j, e in enumerate(errors) if not e]
            for j, e in zip(indices.tolist(), errors):
                if e:
                    skipped.append((paths[j], e))
                else:
                    kept.append(paths[j])
            if good:
                parts.append({k: v.cpu().numpy() for k, v in
                              self.embed(images[good], local=local).items()})
        if parts:
            feats = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        else:
            feats = self([], local=local)
        return kept, feats, skipped


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
            return self.transform(load_image(self.paths[i])), i, ''
        # Any decoder failure (truncated file, text file, decompression bomb, odd mode) concerns this
        # one file only: it is reported, and the extraction goes on.
        except Exception as e:  # noqa: BLE001
            return torch.zeros(3, *self.size), i, '{}: {}'.format(type(e).__name__, e)


# ----------------------------------------------------------------------------- features files

def decode_text(values):
    """h5py strings (bytes or str) -> list of str."""
    return [v.decode('utf-8') if isinstance(v, bytes) else v for v in values]


def open_features(path):
    """Opens a features file written by script/extract.py (read-only h5py.File; close it):
    datasets 'paths' [N], 'global' [N, C], optional 'local' [N, h, c], 'skipped' and
    'skipped_errors' [S]; attributes 'settings' (JSON: model, flip, local, cfg), 'complete'.
    Raises ValueError naming the file if it is not one, or is unfinished."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"features file not found: {path}")
    try:
        f = h5py.File(path, 'r')
    except OSError as e:
        raise ValueError(f"{path}: not an HDF5 file ({e})") from e
    if f.attrs.get('format') != FEATURES_FORMAT:
        f.close()
        raise ValueError(f"{path}: not a features file of script/extract.py")
    if not f.attrs['complete']:
        f.close()
        raise ValueError(f"{path}: the extraction is unfinished (rerun extract.py to complete it)")
    return f


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
