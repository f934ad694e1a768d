"""Data half of the pipeline: the partitions.pkl contract, image names, the test transform, the P x K
identity sampler (DistributedDataParallel aware), the train / test datasets and the two training
input pipelines (loader workers, or decoded images held in memory and augmented in batch)."""
import io
import os
import pickle
import re

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from .augment import IMAGENET_MEAN, IMAGENET_STD, training_set_bytes
from .files import atomic_write
from .signals import started

# 2: image numbers k count train, gallery, query, multi-query images in that order (the older
# reproduction's), so one raw download gives the same images/ names in both; 1 counted query before
# gallery. Files of either version are read alike.
FORMAT_VERSION = 2
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


def partitions_file_problem(path):
    """None when `path` is a file; else what is wrong with it as a partitions file, in one line: not found,
    or a folder (then naming the partitions.pkl expected in it, and whether it is there)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return None
    if os.path.isdir(path):
        inside = os.path.join(path, "partitions.pkl")
        if os.path.isfile(inside):
            return "{} is a folder; the partitions file is the partitions.pkl in it: give {}".format(path, inside)
        return ("{} is a folder without a partitions.pkl; give the partitions.pkl that a data_set/<name>_prepare.py "
                "script wrote beside its images/ folder".format(path))
    return ("partitions file not found: {} (prepare the dataset with data_set/<name>_prepare.py, or pass the "
            "path)".format(path))


def read_partitions(path):
    """Load and validate a partitions.pkl; returns a dict of plain Python values. FileNotFoundError (saying
    so when `path` is a folder) or ValueError, naming the file."""
    path = os.fspath(path)
    problem = partitions_file_problem(path)
    if problem:
        raise FileNotFoundError(problem)
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


def write_partitions(obj, path):
    """Validate, then write atomically (files.atomic_write): an interrupted write never leaves a
    partial file under `path`."""
    path = os.fspath(path)
    validate_partitions(obj, source=path)
    with atomic_write(path) as f:
        pickle.dump(obj, f, protocol=4)


def partitions_images_dir(partitions_path):
    """Images of a prepared dataset sit in `images/` beside its partitions.pkl; the older
    reproduction's combined training set keeps them in `trainval_images/`, used when `images/` is absent."""
    folder = os.path.dirname(os.path.abspath(os.fspath(partitions_path)))
    images = os.path.join(folder, "images")
    if not os.path.isdir(images) and os.path.isdir(os.path.join(folder, "trainval_images")):
        return os.path.join(folder, "trainval_images")
    return images


# ----------------------------------------------------------------------------- transforms

def build_transform(resize_h_w=(256, 128), train=False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Test transform: PIL image -> float tensor [3, H, W], resized (bilinear) and normalised.
    Training augmentation is `aligned_reid.augment.Augment`, whose randomness depends on
    (seed, epoch, position in the epoch) only."""
    if train:
        raise ValueError("build_transform is the test transform; training uses aligned_reid.augment.Augment")
    return T.Compose([T.Resize(tuple(resize_h_w), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                      T.ToTensor(), T.Normalize(mean, std)])


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


load_image = _load_rgb   # the public name: aligned_reid.inference opens its images with it too


def unreadable_image_line(exc):
    """The one-line 'cannot read image <path>: <reason>' of an UnreadableImageError, also when a
    DataLoader worker re-raised it with the worker's whole traceback folded into the message."""
    lines = [l.strip() for l in str(exc).splitlines() if "cannot read image " in l]
    if not lines:
        return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    line = lines[-1]
    return line[line.index("cannot read image "):]


class TrainSet(Dataset):
    """Training images with their labels (ids2labels[person id parsed from the name]).

    Indexed by keys (index, epoch, step, slot) from `TrainLoader`: the image is augmented by
    `augment` (an aligned_reid.augment.Augment) with the randomness of that slot of that step, so
    it does not matter which worker, or how many, load it. Returns (image [3, H, W], label)."""

    def __init__(self, im_dir, im_names, ids2labels, augment):
        self.im_dir, self.im_names, self.augment = im_dir, list(im_names), augment
        self.labels = [ids2labels[parse_im_name(n)[0]] for n in self.im_names]

    def __len__(self):
        return len(self.im_names)

    def __getitem__(self, key):
        i, epoch, step, slot = key
        im = _load_rgb(os.path.join(self.im_dir, self.im_names[i]))
        return self.augment.image(im, epoch, step, slot), self.labels[i]


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


class _DecodeSet(Dataset):
    """uint8 images [3, h, w], resized (bilinear), for filling the in-memory training set."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        im = _load_rgb(self.paths[i]).resize((self.size[1], self.size[0]), Image.BILINEAR)
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy())


def decode_images(paths, size, workers=2, pin_memory=False):
    """Decodes and resizes every image of `paths` to `size` (h, w): uint8 tensor [N, 3, h, w] on
    the host (in pinned memory with pin_memory). Uses `workers` loader processes."""
    out = torch.empty((len(paths), 3) + tuple(size), dtype=torch.uint8, pin_memory=pin_memory)
    loader = DataLoader(_DecodeSet(list(paths), tuple(size)), batch_size=64, num_workers=workers)
    n = 0
    for batch in started(loader):
        out[n:n + len(batch)] = batch
        n += len(batch)
    return out


class _SlotKeys:
    """Batch sampler for `TrainLoader`: the PKSampler's batches from `start_step` on, each index
    paired with (epoch, step, slot in the global batch) so that its augmentation is fixed."""

    def __init__(self, sampler):
        self.sampler, self.start_step = sampler, 0

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        s = self.sampler
        offset = s.rank * (s.ids_per_batch // s.world_size) * s.ims_per_id
        for step, batch in enumerate(s):
            if step >= self.start_step:
                yield [(i, s.epoch, step, offset + slot) for slot, i in enumerate(batch)]


class TrainLoader:
    """P x K batches (images [B, 3, H, W], labels [B]) decoded and augmented by loader workers that
    live across epochs (persistent, prefetching, pinned memory on CUDA). Call `set_epoch(epoch,
    start_step)` before iterating an epoch; batches and augmentation depend on (seed, epoch, step)
    only, so a resumed run sees exactly the data of an uninterrupted one, whatever the workers."""

    pipeline = "workers"

    def __init__(self, dataset, sampler, workers=2, pin_memory=False, prefetch=2):
        self.dataset, self.sampler, self.keys = dataset, sampler, _SlotKeys(sampler)
        self.loader = DataLoader(dataset, batch_sampler=self.keys, num_workers=workers,
                                 pin_memory=pin_memory, persistent_workers=workers > 0,
                                 prefetch_factor=prefetch if workers > 0 else None)

    def set_epoch(self, epoch, start_step=0):
        self.sampler.set_epoch(epoch)
        self.keys.start_step = start_step

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        return iter(self.loader)


class MemoryTrainLoader:
    """P x K batches from decoded uint8 images held in memory ([N, 3, H, W], on the training device
    or in pinned host memory), augmented in batch on the device by `Augment.batch`: no workers, no
    JPEG decoding after the start, a few kernels per batch. Same interface and the same
    (seed, epoch, step)-determined randomness as `TrainLoader`."""

    pipeline = "memory"

    def __init__(self, images, labels, sampler, augment, device):
        self.images, self.sampler, self.augment = images, sampler, augment
        self.device, self.start_step = torch.device(device), 0
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(images.device)

    def set_epoch(self, epoch, start_step=0):
        self.sampler.set_epoch(epoch)
        self.start_step = start_step

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        s = self.sampler
        offset = s.rank * (s.ids_per_batch // s.world_size) * s.ims_per_id
        cuda = self.device.type == "cuda"
        for step, batch in enumerate(s):
            if step < self.start_step:
                continue
            idx = torch.as_tensor(batch, dtype=torch.int64)
            if cuda:
                idx = idx.pin_memory()
            idx = idx.to(self.images.device, non_blocking=True)
            u8, labels = self.images.index_select(0, idx), self.labels.index_select(0, idx)
            if u8.device != self.device:  # images in host memory: one copy of the batch
                u8 = (u8.pin_memory() if cuda else u8).to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield self.augment.batch(u8, s.epoch, step, offset), labels


def choose_train_pipeline(requested, device, num_images, size):
    """'workers' or 'memory' for --train_pipeline `requested` (auto | workers | memory), and where a
    memory pipeline keeps the images ('device' or 'host'). auto: memory on CUDA (on the device when
    the decoded set takes at most half of its free memory, else in pinned host memory), workers on
    the CPU, where batched augmentation gains nothing over workers. Returns (pipeline, store)."""
    if requested not in ("auto", "workers", "memory"):
        raise ValueError("train pipeline must be auto, workers or memory, got {!r}".format(requested))
    device = torch.device(device)
    if requested == "workers" or (requested == "auto" and device.type != "cuda"):
        return "workers", None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if training_set_bytes(num_images, size) <= free // 2:
            return "memory", "device"
    return "memory", "host"


def make_train_loader(im_dir, im_names, ids2labels, ids_per_batch, ims_per_id, augment, workers=2,
                      seed=0, rank=0, world_size=1, device="cpu", pipeline="workers", store="device"):
    """The P x K training batches of a split. pipeline 'workers': a `TrainLoader`, batches on the host
    (pinned on CUDA). pipeline 'memory': a `MemoryTrainLoader`, images decoded once by `workers`
    processes and kept on `device` (store 'device') or in host memory (store 'host'), batches on
    `device`. Call `loader.set_epoch(epoch, start_step)` before each epoch."""
    dataset = TrainSet(im_dir, im_names, ids2labels, augment)
    sampler = PKSampler(dataset.labels, ids_per_batch, ims_per_id, seed=seed, rank=rank,
                        world_size=world_size)
    device = torch.device(device)
    if pipeline == "workers":
        loader = TrainLoader(dataset, sampler, workers=workers, pin_memory=device.type == "cuda")
    elif pipeline == "memory":
        if store not in ("device", "host"):
            raise ValueError("store must be 'device' or 'host', got {!r}".format(store))
        on_host = store == "host" and device.type == "cuda"
        images = decode_images([os.path.join(im_dir, n) for n in dataset.im_names], augment.size,
                               workers=workers, pin_memory=on_host)
        loader = MemoryTrainLoader(images if on_host else images.to(device), dataset.labels, sampler,
                                   augment, device)
    else:
        raise ValueError("pipeline must be 'workers' or 'memory', got {!r}".format(pipeline))
    loader.set_epoch(0)
    return loader


def set_loader_epoch(loader, epoch, start_step=0):
    """loader.set_epoch(epoch, start_step): the sampler's order and the augmentation of that epoch."""
    loader.set_epoch(epoch, start_step)


def make_test_loader(im_dir, im_names, marks, transform, batch_size=64, workers=2, pin_memory=False):
    """DataLoader over a test split in file order, yielding (images [B, 3, H, W], indices [B])."""
    dataset = TestSet(im_dir, im_names, marks, transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=pin_memory)
