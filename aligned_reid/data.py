"""Data half of the pipeline: the partitions.pkl contract, image names, transforms, the P x K
identity sampler (DistributedDataParallel aware) and the train / test datasets and loaders."""
import io
import os
import pickle
import re
import tempfile

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FORMAT_VERSION = 1
# (image-name key, companion key, companion kind) for every split of the contract.
SPLITS = (
    ("trainval_im_names", "trainval_ids2labels", "ids2labels"),
    ("train_im_names", "train_ids2labels", "ids2labels"),
    ("val_im_names", "val_marks", "marks"),
    ("test_im_names", "test_marks", "marks"),
)
METADATA_KEYS = ("format_version", "dataset")
VALID_MARKS = (0, 1, 2)  # query, gallery, multi-query

_IM_NAME = re.compile(r"^(-?\d+)_(\d+)_(\d+)\.jpg$")


# ----------------------------------------------------------------------------- image names

def make_im_name(pid, cam, k):
    """Contract name of the k-th image of person `pid` seen by camera `cam`."""
    return "{:08d}_{:04d}_{:08d}.jpg".format(pid, cam, k)


def parse_im_name(name):
    """'00000002_0001_00000000.jpg' -> (2, 1). Only the base name is looked at."""
    m = _IM_NAME.match(os.path.basename(name))
    if m is None:
        raise ValueError(
            "image name {!r} does not follow the contract '<id:08d>_<cam:04d>_<k:08d>.jpg'".format(name))
    return int(m.group(1)), int(m.group(2))


# ----------------------------------------------------------------------------- partitions.pkl

class _PartitionsUnpickler(pickle.Unpickler):
    """Admits plain Python values, plus numpy arrays and scalars (partitions files of the
    older reproduction hold numpy string arrays). Any other class is refused."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # how protocol-2 pickles spell bytes (numpy array buffers)
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            "refusing to load {}.{}: a partitions file holds only lists, dicts, str and int"
            .format(module, name))


def _to_plain(obj):
    """Numpy arrays / scalars and bytes -> lists, int, str (recursively)."""
    if isinstance(obj, np.ndarray):
        return [_to_plain(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        return _to_plain(obj.item())
    if isinstance(obj, bytes):
        return obj.decode("utf-8")
    if isinstance(obj, dict):
        return {_to_plain(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def read_partitions(path):
    """Load and validate a partitions.pkl; returns a dict of plain Python values."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError("partitions file not found: {}".format(path))
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = _PartitionsUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise ValueError("{}: {}".format(path, e)) from None
    except Exception as e:  # truncated or not a pickle at all
        raise ValueError("{}: not a readable partitions file ({}: {})".format(
            path, type(e).__name__, e)) from None
    obj = _to_plain(obj)
    validate_partitions(obj, source=path)
    return obj


def validate_partitions(obj, source=""):
    """Raise ValueError naming the key (and `source`) unless `obj` follows the contract."""
    where = " in {}".format(source) if source else ""

    def fail(msg):
        raise ValueError("invalid partitions{}: {}".format(where, msg))

    if not isinstance(obj, dict):
        fail("expected a dict, got {}".format(type(obj).__name__))
    if "trainval_im_names" not in obj:
        fail("missing key 'trainval_im_names'")
    known = {k for split in SPLITS for k in split[:2]} | set(METADATA_KEYS)
    for key in obj:
        if key not in known:
            fail("unknown key {!r}".format(key))
    for names_key, other_key, kind in SPLITS:
        if names_key not in obj and other_key not in obj:
            continue
        if names_key not in obj or other_key not in obj:
            fail("{!r} and {!r} must be given together".format(names_key, other_key))
        names, other = obj[names_key], obj[other_key]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            fail("{!r} must be a list of str".format(names_key))
        if not names:
            fail("{!r} is empty".format(names_key))
        for n in names:
            try:
                parse_im_name(n)
            except ValueError as e:
                fail("{!r}: {}".format(names_key, e))
        if kind == "marks":
            if not isinstance(other, list) or len(other) != len(names):
                fail("{!r} must be a list as long as {!r}".format(other_key, names_key))
            bad = [m for m in other if m not in VALID_MARKS]
            if bad:
                fail("{!r} holds {!r}; marks are 0 (query), 1 (gallery), 2 (multi-query)".format(
                    other_key, bad[0]))
            if 0 not in other or 1 not in other:
                fail("{!r} needs at least one query (0) and one gallery (1) image".format(other_key))
        else:
            if not isinstance(other, dict) or not all(
                    isinstance(k, int) and isinstance(v, int) for k, v in other.items()):
                fail("{!r} must be a dict of int person id -> int label".format(other_key))
            if sorted(other.values()) != list(range(len(other))):
                fail("{!r} labels must be 0..{}".format(other_key, len(other) - 1))
            missing = {parse_im_name(n)[0] for n in names} - set(other)
            if missing:
                fail("{!r} has no label for person id {}".format(other_key, min(missing)))
    version = obj.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        fail("format_version {!r} is newer than this code reads ({})".format(version, FORMAT_VERSION))


def _umask_mode():
    """0666 minus the process umask: the mode open() would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_partitions(obj, path):
    """Validate, then write atomically: a temporary file in the same folder, fsync, rename.
    An interrupted write never leaves a partial file under `path`."""
    path = os.fspath(path)
    validate_partitions(obj, source=path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partitions-", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, _umask_mode())  # mkstemp makes 0600: a set prepared for a group stays readable
        with os.fdopen(fd, "wb") as f:
            pickle.dump(obj, f, protocol=4)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def partitions_images_dir(partitions_path):
    """Images of a prepared dataset sit in `images/` beside its partitions.pkl."""
    return os.path.join(os.path.dirname(os.path.abspath(os.fspath(partitions_path))), "images")


# ----------------------------------------------------------------------------- transforms

class RandomCropResize:
    """With probability `prob`, crop a random window of `ratio` x the image's height and width,
    then resize back to `size` (h, w); otherwise resize only."""

    def __init__(self, size, prob, ratio):
        self.size, self.prob, self.ratio = tuple(size), prob, ratio

    def __call__(self, im):
        if self.prob > 0 and self.ratio < 1 and torch.rand(()).item() < self.prob:
            w, h = im.size
            cw, ch = max(1, round(w * self.ratio)), max(1, round(h * self.ratio))
            x0 = int(torch.randint(0, w - cw + 1, ()).item())
            y0 = int(torch.randint(0, h - ch + 1, ()).item())
            im = im.crop((x0, y0, x0 + cw, y0 + ch))
        return im.resize((self.size[1], self.size[0]), Image.BILINEAR)


def build_transform(resize_h_w=(256, 128), train=False, flip=True, crop_prob=0.0, crop_ratio=1.0,
                    random_erasing=0.0, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """PIL image -> float tensor [3, H, W], normalised. Training adds random horizontal flip,
    optional random crop (crop_prob, crop_ratio) and random erasing (its probability)."""
    if not 0 <= crop_prob <= 1 or not 0 < crop_ratio <= 1 or not 0 <= random_erasing <= 1:
        raise ValueError("crop_prob and random_erasing must lie in [0, 1], crop_ratio in (0, 1]")
    steps = [RandomCropResize(resize_h_w, crop_prob if train else 0.0, crop_ratio)]
    if train and flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if train and random_erasing > 0:
        steps.append(T.RandomErasing(p=random_erasing, value=0))
    return T.Compose(steps)


# ----------------------------------------------------------------------------- sampler

class PKSampler(torch.utils.data.Sampler):
    """P x K batches (Hermans et al.): `ids_per_batch` identities, `ims_per_id` images each.

    Every identity is visited once per epoch in a shuffled order; its images are drawn without
    replacement, or with replacement when it has fewer than `ims_per_id`. The incomplete last
    batch is dropped. Batches depend only on (seed, epoch). Under DistributedDataParallel each
    global batch is split by identity: rank r yields identities [r*P/W, (r+1)*P/W) of it, so the
    ranks' shares are disjoint and together make the global batch. Yields lists of indices.
    """

    def __init__(self, labels, ids_per_batch, ims_per_id, seed=0, rank=0, world_size=1):
        if ids_per_batch < 1 or ims_per_id < 1:
            raise ValueError("ids_per_batch and ims_per_id must be positive")
        if ids_per_batch % world_size:
            raise ValueError("ids_per_batch ({}) must be divisible by the number of processes ({})"
                             .format(ids_per_batch, world_size))
        if not 0 <= rank < world_size:
            raise ValueError("rank {} outside 0..{}".format(rank, world_size - 1))
        labels = np.asarray(labels, dtype=np.int64)
        self.ids = np.unique(labels)
        if len(self.ids) < ids_per_batch:
            raise ValueError("ids_per_batch ({}) exceeds the number of identities ({})".format(
                ids_per_batch, len(self.ids)))
        order = np.argsort(labels, kind="stable")
        starts = np.searchsorted(labels[order], self.ids)
        self.index_lists = np.split(order, starts[1:])
        self.ids_per_batch, self.ims_per_id = ids_per_batch, ims_per_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.ids) // self.ids_per_batch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(len(self.ids))
        share = self.ids_per_batch // self.world_size
        for b in range(len(self)):
            batch_ids = perm[b * self.ids_per_batch:(b + 1) * self.ids_per_batch]
            batch = []
            for i in batch_ids:
                pool = self.index_lists[i]
                batch.append(rng.choice(pool, self.ims_per_id, replace=len(pool) < self.ims_per_id))
            # Draw for every rank so all ranks advance the RNG alike, then keep this rank's share.
            mine = batch[self.rank * share:(self.rank + 1) * share]
            yield np.concatenate(mine).tolist()


# ----------------------------------------------------------------------------- datasets

class UnreadableImageError(RuntimeError):
    """An image of a prepared set cannot be read or decoded; the message names the file."""


def _load_rgb(path):
    """The image at `path` as an RGB PIL image; UnreadableImageError naming the file when it is
    missing, empty, truncated or not an image."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImageError("cannot read image {}: {}".format(path, e)) from None


def unreadable_image_line(exc):
    """The one-line 'cannot read image <path>: <reason>' of an UnreadableImageError, also when a
    DataLoader worker re-raised it with the worker's whole traceback folded into the message."""
    lines = [l.strip() for l in str(exc).splitlines() if "cannot read image " in l]
    if not lines:
        return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    line = lines[-1]
    return line[line.index("cannot read image "):]


class TrainSet(Dataset):
    """(image [3, H, W], label) pairs; label = ids2labels[person id parsed from the name]."""

    def __init__(self, im_dir, im_names, ids2labels, transform):
        self.im_dir, self.im_names, self.transform = im_dir, list(im_names), transform
        self.labels = [ids2labels[parse_im_name(n)[0]] for n in self.im_names]

    def __len__(self):
        return len(self.im_names)

    def __getitem__(self, i):
        return self.transform(_load_rgb(os.path.join(self.im_dir, self.im_names[i]))), self.labels[i]


class TestSet(Dataset):
    """(image [3, H, W], index) pairs; ids, cams and marks (0 query, 1 gallery, 2 multi-query)
    are exposed as int64 arrays aligned with the index."""

    def __init__(self, im_dir, im_names, marks, transform):
        self.im_dir, self.im_names, self.transform = im_dir, list(im_names), transform
        if len(marks) != len(self.im_names):
            raise ValueError("{} marks for {} images".format(len(marks), len(self.im_names)))
        parsed = np.array([parse_im_name(n) for n in self.im_names], dtype=np.int64).reshape(-1, 2)
        self.ids, self.cams = parsed[:, 0], parsed[:, 1]
        self.marks = np.asarray(marks, dtype=np.int64)

    def __len__(self):
        return len(self.im_names)

    def __getitem__(self, i):
        return self.transform(_load_rgb(os.path.join(self.im_dir, self.im_names[i]))), i


def make_train_loader(im_dir, im_names, ids2labels, ids_per_batch, ims_per_id, transform, workers=2,
                      seed=0, rank=0, world_size=1, pin_memory=False):
    """DataLoader of P x K batches (images [B, 3, H, W], labels [B]). Call
    `set_loader_epoch(loader, epoch)` before each epoch: batches and augmentation then depend
    only on (seed, epoch), so a resumed run sees the same data as an uninterrupted one."""
    dataset = TrainSet(im_dir, im_names, ids2labels, transform)
    sampler = PKSampler(dataset.labels, ids_per_batch, ims_per_id, seed=seed, rank=rank,
                        world_size=world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                        generator=torch.Generator())
    loader.seed = seed
    set_loader_epoch(loader, 0)
    return loader


def set_loader_epoch(loader, epoch):
    """Make the sampler's order and the workers' augmentation seeds functions of the epoch."""
    loader.batch_sampler.set_epoch(epoch)
    rank = loader.batch_sampler.rank
    loader.generator.manual_seed(int(np.random.default_rng([loader.seed, epoch, rank]).integers(2**62)))


def make_test_loader(im_dir, im_names, marks, transform, batch_size=64, workers=2, pin_memory=False):
    """DataLoader over a test split in file order, yielding (images [B, 3, H, W], indices [B])."""
    dataset = TestSet(im_dir, im_names, marks, transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=pin_memory)
