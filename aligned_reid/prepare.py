"""Dataset preparation: raw item lists -> renamed images/ + partitions.pkl (shared by every
data_set/*_prepare.py script), and the reader of the Market-1501 folder layout (Market, Duke, CUHK03-NP)."""
import errno
import io
import os
import random
import re
import shutil
import sys
import threading
import warnings
import zipfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from aligned_reid.data import FORMAT_VERSION, make_im_name, parse_im_name, validate_partitions, write_partitions
from aligned_reid.signals import signals_deferred

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp')
SPLITS = ('trainval', 'query', 'gallery', 'multi_query')
TEST_MARKS = {'query': 0, 'gallery': 1, 'multi_query': 2}
MARKET_SUBDIRS = {'bounding_box_train': 'trainval', 'query': 'query',
                  'bounding_box_test': 'gallery', 'gt_bbox': 'multi_query'}

# Official statistics, checked when a full dataset is prepared (stats keys of compute_stats).
OFFICIAL_COUNTS = {
    'market1501': dict(trainval_ids=751, trainval_images=12936, query_ids=750, query_images=3368,
                       gallery_images=15913),
    'duke': dict(trainval_ids=702, trainval_images=16522, query_images=2228, gallery_images=17661),
    'cuhk03_labeled': dict(trainval_ids=767, trainval_images=7368, query_ids=700, query_images=1400,
                           gallery_images=5328),
    'cuhk03_detected': dict(trainval_ids=767, trainval_images=7365, query_ids=700, query_images=1400,
                            gallery_images=5332),
    'msmt17': dict(trainval_ids=1041, trainval_images=32621, test_ids=3060, query_images=11659,
                   gallery_images=82161, cameras=15),
}

# Market-1501: 0002_c1s1_000451_03.jpg; Duke: 0001_c2_f0046182.jpg; CUHK03-NP: 0001_c1_1.png.
MARKET_NAME_RE = re.compile(r'(-1|\d+)_c(\d+)(?:s\d+)?_[^/\n]*')


class Item(NamedTuple):
    """One raw image. src: a file path (hard-linked or copied), a ZipMember, an H x W x 3 uint8 array
    (encoded as JPEG), or a callable returning such an array."""
    src: object
    pid: int
    cam: int
    split: str  # one of SPLITS


class ZipMember(NamedTuple):
    """An image stored in a zip archive, read without extracting the archive."""
    zip_path: str
    member: str


def is_image_name(name):
    """True for image files; hidden files (macOS '._x.jpg', '.DS_Store') and Thumbs.db are not images."""
    base = os.path.basename(name)
    return not base.startswith('.') and base.lower().endswith(IMAGE_EXTS)


def parse_market_name(name):
    """'0002_c1s1_000451_03.jpg' -> (pid, cam); pid -1 is junk, 0 a distractor. ValueError naming the file."""
    m = MARKET_NAME_RE.fullmatch(os.path.basename(name))
    if m is None:
        raise ValueError(f'cannot parse person id and camera from image name {name!r} '
                         "(expected e.g. '0002_c1s1_000451_03.jpg' or '0001_c2_f0046182.jpg')")
    return int(m.group(1)), int(m.group(2))


# ----------------------------------------------------------------------------- writing

def _recover_interrupted_swap(save_dir):
    """Finishes or undoes a write_prepared swap that a hard kill cut short (signals are deferred during
    the swap, so only SIGKILL or a power cut can do that): if the new partitions file was not yet in
    place, the old images/ come back; otherwise the old images are removed. Returns a note or None."""
    images = os.path.join(save_dir, 'images')
    old, new_pkl = images + '.old', os.path.join(save_dir, 'partitions.pkl.partial')
    if not os.path.lexists(old):
        if os.path.lexists(new_pkl):
            os.remove(new_pkl)
        return None
    if os.path.lexists(new_pkl) or not os.path.lexists(images):
        if os.path.lexists(images):
            shutil.rmtree(images)
        os.replace(old, images)
        if os.path.lexists(new_pkl):
            os.remove(new_pkl)
        return f'{save_dir}: restored the previous set that an interrupted --overwrite had moved aside'
    shutil.rmtree(old)
    return f'{save_dir}: removed {old} left by an interrupted --overwrite'


def check_save_dir(save_dir, overwrite=False, raw_paths=()):
    """Refuses (FileExistsError) a save_dir that already holds images/ or partitions.pkl unless
    overwrite, and (ValueError) raw inputs inside the folders a run replaces. Returns abs save_dir."""
    save_dir = os.path.abspath(os.path.expanduser(save_dir))
    images = os.path.join(save_dir, 'images')
    pkl = os.path.join(save_dir, 'partitions.pkl')
    for raw in raw_paths:
        raw_real = os.path.realpath(raw)
        for own in (images, images + '.partial', images + '.old'):
            own_real = os.path.realpath(own)
            if raw_real == own_real or raw_real.startswith(own_real + os.sep):
                raise ValueError(f'raw input {raw} lies inside the output folder {own}; '
                                 'choose another --save_dir')
    if os.path.isdir(save_dir):
        note = _recover_interrupted_swap(save_dir)
        if note:
            print(note)
    existing = [p for p in (pkl, images) if os.path.lexists(p)]
    if existing and not overwrite:
        raise FileExistsError(f'{save_dir} already holds a prepared dataset ({", ".join(existing)}); '
                              'pass --overwrite (overwrite=True) to replace it')
    return save_dir


def _swap_in(save_dir, partial, new_pkl):
    """Replaces <save_dir>/images and partitions.pkl by the complete new ones (partial, new_pkl): the old
    images move to images.old, the new ones and the new partitions file take their places, then the old
    images are deleted. Signals wait until the three renames are done."""
    images = os.path.join(save_dir, 'images')
    old = images + '.old'
    with signals_deferred():
        if os.path.lexists(images):
            os.replace(images, old)
        os.replace(partial, images)
        os.replace(new_pkl, os.path.join(save_dir, 'partitions.pkl'))
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
    elif os.path.lexists(old):
        os.remove(old)


# The order in which k counts the images of one (id, camera): the older reproduction's (train, gallery,
# query, multi-query), so that one raw download gives it and us the same images/ names (format version 2).
NAMING_ORDER = {'trainval': 0, 'gallery': 1, 'query': 2, 'multi_query': 3}


def assign_names(items):
    """New name per item (returned in item order): make_im_name(pid, cam, k) with k counting per
    (pid, cam) over the splits in NAMING_ORDER, in item order within a split."""
    counter = Counter()
    names = [None] * len(items)
    for i in sorted(range(len(items)), key=lambda i: NAMING_ORDER.get(items[i].split, len(NAMING_ORDER))):
        it = items[i]
        key = (it.pid, it.cam)
        names[i] = make_im_name(it.pid, it.cam, counter[key])
        counter[key] += 1
    return names


class _Writer:
    """Materialises items: hard link when possible, else copy; arrays are encoded as JPEG."""

    def __init__(self, link=True):
        self.link = link
        self.linked = self.copied = self.encoded = 0
        self._zips = {}

    def write(self, src, dst):
        if callable(src):  # a lazy loader, e.g. of an image stored in a .mat file
            src = src()
        if isinstance(src, np.ndarray):
            from PIL import Image
            Image.fromarray(src).save(dst, format='JPEG', quality=95)
            self.encoded += 1
        elif isinstance(src, ZipMember):
            zf = self._zips.get(src.zip_path)
            if zf is None:
                zf = self._zips[src.zip_path] = zipfile.ZipFile(src.zip_path)
            with zf.open(src.member) as fin, open(dst, 'wb') as fout:
                shutil.copyfileobj(fin, fout)
            self.copied += 1
        else:
            if self.link:
                try:
                    os.link(src, dst)
                    self.linked += 1
                    return
                except OSError as e:
                    if not os.path.exists(src):
                        raise FileNotFoundError(f'image listed but missing: {src}') from e
                    if e.errno in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EACCES):
                        self.link = False  # another file system: copy from now on
            try:
                shutil.copyfile(src, dst)
            except FileNotFoundError as e:
                raise FileNotFoundError(f'image listed but missing: {src}') from e
            self.copied += 1

    def close(self):
        for zf in self._zips.values():
            zf.close()


def write_images(items, names, images_dir, link=True):
    """Writes every item to images_dir/<name>. Returns {'linked', 'copied', 'encoded'} counts."""
    writer = _Writer(link=link)
    try:
        for it, name in zip(items, names):
            writer.write(it.src, os.path.join(images_dir, name))
    finally:
        writer.close()
    return dict(linked=writer.linked, copied=writer.copied, encoded=writer.encoded)


class BadImagesError(ValueError):
    """Some input images cannot be decoded; the message lists them."""


def _describe(src):
    return f'{src.zip_path}:{src.member}' if isinstance(src, ZipMember) else str(src)


def decode_problem(src, zips=None):
    """None when the image `src` (a path or a ZipMember) decodes, else the reason in a few
    words. `zips`: a dict of open ZipFile objects to reuse (one per thread). FileNotFoundError for a
    listed file that does not exist. Arrays and callables (images the prepare script renders or reads
    from .mat files itself) are not checked."""
    from PIL import Image, UnidentifiedImageError
    if not isinstance(src, (str, os.PathLike, ZipMember)):
        return None
    try:
        if isinstance(src, ZipMember):
            zips = {} if zips is None else zips
            zf = zips.get(src.zip_path)
            if zf is None:
                zf = zips[src.zip_path] = zipfile.ZipFile(src.zip_path)
            fp = io.BytesIO(zf.read(src.member))
            empty = not fp.getbuffer().nbytes
        else:
            fp = src
            empty = os.path.getsize(src) == 0
        if empty:
            return 'empty file (0 bytes)'
        with Image.open(fp) as im:
            # Image.open reads the header only; load() decodes. JPEGs decode at 1/8 scale (libjpeg's DCT
            # scaling): all the compressed data is still read and entropy-decoded, so empty, truncated and
            # damaged files fail the same way as at full size, at a fraction of the cost.
            im.draft('RGB', (1, 1))
            im.load()
    except FileNotFoundError as e:
        raise FileNotFoundError(f'image listed but missing: {_describe(src)}') from e
    except UnidentifiedImageError:
        return 'not an image Pillow can identify'
    except (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__
    return None


def find_bad_images(items, workers=None):
    """Decodes every item's image in threads (Pillow releases the GIL while decoding). Returns
    [(index, 'path: reason')] of the images that fail, in item order."""
    local = threading.local()

    def check(i):
        if not hasattr(local, 'zips'):
            local.zips = {}
        why = decode_problem(items[i].src, local.zips)
        return None if why is None else (i, f'{_describe(items[i].src)}: {why}')

    workers = workers or min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        return [r for r in pool.map(check, range(len(items)), chunksize=256) if r is not None]
    finally:  # on Ctrl-C, drop the images not yet started instead of decoding them all first
        pool.shutdown(wait=True, cancel_futures=True)


def drop_bad_images(items, skip_bad_images=False, verbose=True, max_listed=20):
    """Decodes every image of `items`. With bad ones: raises BadImagesError listing them (up to
    max_listed), or, with skip_bad_images, leaves them out and prints their count and list.
    Returns (items kept, number left out)."""
    bad = find_bad_images(items)
    if not bad:
        return items, 0
    listing = '\n'.join('  ' + line for _, line in bad[:max_listed])
    if len(bad) > max_listed:
        listing += f'\n  ... and {len(bad) - max_listed} more'
    if not skip_bad_images:
        raise BadImagesError(f'{len(bad)} of {len(items)} input images cannot be decoded (re-download '
                             f'them, or pass --skip_bad_images to leave them out):\n{listing}')
    drop = {i for i, _ in bad}
    if verbose:
        print(f'--skip_bad_images: left out {len(bad)} of {len(items)} images that cannot be decoded:\n{listing}')
    return [it for i, it in enumerate(items) if i not in drop], len(bad)


def _ids2labels(pids):
    return {int(pid): label for label, pid in enumerate(sorted(set(pids)))}


def val_marks_for_identity(cams):
    """Query/gallery marks for the images (in running-index order) of one validation identity.

    Rule: the first image of each camera is a query (0) and the rest gallery (1), except that a
    camera's query is turned into a gallery image when no gallery image of another camera would be
    left to match it (cameras taken in increasing order). cams: list of camera ids. Returns marks."""
    first = {}
    for i, cam in enumerate(cams):
        first.setdefault(cam, i)
    marks = [1] * len(cams)
    for i in first.values():
        marks[i] = 0
    gallery_per_cam = Counter(c for c, m in zip(cams, marks) if m == 1)
    for cam in sorted(first):
        others = sum(n for c, n in gallery_per_cam.items() if c != cam)
        if others == 0:
            marks[first[cam]] = 1
            gallery_per_cam[cam] += 1
    return marks


def split_train_val(names, pids, cams, num_val_ids=100, seed=1):
    """Holds out num_val_ids identities, drawn with random.Random(seed) from the ids seen by at
    least two cameras, as a validation set marked by val_marks_for_identity.
    Returns (train_names, val_names, val_marks)."""
    cams_of = defaultdict(set)
    for pid, cam in zip(pids, cams):
        cams_of[pid].add(cam)
    eligible = sorted(pid for pid, c in cams_of.items() if len(c) >= 2)
    if num_val_ids < 0 or num_val_ids > len(eligible) or num_val_ids >= len(cams_of):
        raise ValueError(f'num_val_ids={num_val_ids}: the training set has {len(cams_of)} identities, '
                         f'{len(eligible)} of them seen by two or more cameras; at most '
                         f'{min(len(eligible), len(cams_of) - 1)} can be held out for validation')
    val_ids = set(random.Random(seed).sample(eligible, num_val_ids))
    train_names, val_idx = [], defaultdict(list)
    for i, (name, pid) in enumerate(zip(names, pids)):
        if pid in val_ids:
            val_idx[pid].append(i)
        else:
            train_names.append(name)
    marks = {}
    for idx in val_idx.values():
        marks.update(zip(idx, val_marks_for_identity([cams[i] for i in idx])))
    order = sorted(marks)
    return train_names, [names[i] for i in order], [marks[i] for i in order]


def build_partitions(items, names, dataset, num_val_ids=100, seed=1, trainval_only=False):
    """The partitions.pkl dict (ARCHITECTURE section 4) for items already named by assign_names."""
    by_split = defaultdict(list)
    for it, name in zip(items, names):
        by_split[it.split].append((name, it.pid, it.cam))
    tv = by_split['trainval']
    tv_names = [n for n, _, _ in tv]
    tv_pids = [p for _, p, _ in tv]
    part = dict(format_version=FORMAT_VERSION, dataset=dataset,
                trainval_im_names=tv_names, trainval_ids2labels=_ids2labels(tv_pids))
    if trainval_only:
        return part
    train_names, val_names, val_marks = split_train_val(
        tv_names, tv_pids, [c for _, _, c in tv], num_val_ids=num_val_ids, seed=seed)
    train_set = set(train_names)
    part['train_im_names'] = train_names
    part['train_ids2labels'] = _ids2labels(p for n, p in zip(tv_names, tv_pids) if n in train_set)
    if val_names:  # num_val_ids=0: no validation keys (the contract has no empty lists)
        part['val_im_names'] = val_names
        part['val_marks'] = val_marks
    test = [(n, TEST_MARKS[s]) for s in ('query', 'gallery', 'multi_query') for n, _, _ in by_split[s]]
    part['test_im_names'] = [n for n, _ in test]
    part['test_marks'] = [m for _, m in test]
    return part


def compute_stats(items):
    """Counts per split: {split}_ids, {split}_images, plus test_ids, distractor_images, cameras."""
    stats = {}
    ids = defaultdict(set)
    for it in items:
        stats[it.split + '_images'] = stats.get(it.split + '_images', 0) + 1
        ids[it.split].add(it.pid)
    for split in SPLITS:
        stats.setdefault(split + '_images', 0)
        stats[split + '_ids'] = len(ids[split])
    stats['test_ids'] = len((ids['query'] | ids['gallery']) - {0})
    stats['distractor_images'] = sum(1 for it in items if it.pid == 0 and it.split != 'trainval')
    stats['cameras'] = len({it.cam for it in items})
    return stats


def format_stats(dataset, stats, partitions):
    """The statistics table printed after preparation."""
    rows = [('trainval', stats['trainval_ids'], stats['trainval_images'])]
    if 'train_im_names' in partitions:
        val_marks = partitions.get('val_marks', [])
        rows += [('train', len(partitions['train_ids2labels']), len(partitions['train_im_names'])),
                 ('val query', '', val_marks.count(0)), ('val gallery', '', val_marks.count(1)),
                 ('query', stats['query_ids'], stats['query_images']),
                 ('gallery', stats['gallery_ids'], stats['gallery_images']),
                 ('multi-query', stats['multi_query_ids'], stats['multi_query_images'])]
        num_val = len({parse_im_name(n)[0] for n in partitions.get('val_im_names', [])})
        rows[2] = ('val query', num_val, rows[2][2])
    lines = [f'{dataset}: {stats["cameras"]} cameras', f'{"split":<12}{"ids":>8}{"images":>10}']
    lines += [f'{name:<12}{ids!s:>8}{n:>10}' for name, ids, n in rows]
    if stats.get('distractor_images'):
        lines.append(f'(gallery includes {stats["distractor_images"]} distractor images, id 0)')
    return '\n'.join(lines)


def check_counts(stats, expected, dataset=''):
    """Compares compute_stats counts with the expected (official) ones and issues one warning
    naming every split that differs. Returns the list of mismatch messages (empty when all match)."""
    problems = []
    for key, want in (expected or {}).items():
        got = stats.get(key)
        if got != want:
            split, _, what = key.rpartition('_')
            problems.append(f'split {split!r}: {got} {what}, official {want}' if split
                            else f'{key}: {got}, official {want}')
    if problems:
        warnings.warn(f'{dataset} counts differ from the official ones (not the full dataset?): '
                      + '; '.join(problems), stacklevel=3)
    return problems


def write_prepared(items, save_dir, dataset, overwrite=False, num_val_ids=100, seed=1,
                   expected=None, trainval_only=False, link=True, raw_paths=(), verbose=True,
                   skip_bad_images=False, check_images=True):
    """Writes <save_dir>/images/ and <save_dir>/partitions.pkl from a list of Items.

    Every input image is decoded first (check_images): a bad one stops the run with the list
    (BadImagesError), or is left out with skip_bad_images. The new set is built beside the old one
    (images.partial/, partitions.pkl.partial) and swapped in only when complete, so an interrupted run
    (Ctrl-C, an error, a full disk) leaves the previous set whole and a rerun works.
    Returns the partitions dict."""
    save_dir = check_save_dir(save_dir, overwrite, raw_paths)
    if check_images:
        items, _ = drop_bad_images(items, skip_bad_images=skip_bad_images, verbose=verbose)
    for split in (('trainval',) if trainval_only else ('trainval', 'query', 'gallery')):
        if not any(it.split == split for it in items):
            raise ValueError(f'{dataset}: the {split} split is empty')
    names = assign_names(items)
    partitions = build_partitions(items, names, dataset, num_val_ids=num_val_ids, seed=seed,
                                  trainval_only=trainval_only)
    validate_partitions(partitions, source=f'{dataset} (before writing {save_dir})')
    os.makedirs(save_dir, exist_ok=True)
    images = os.path.join(save_dir, 'images')
    partial = images + '.partial'
    new_pkl = os.path.join(save_dir, 'partitions.pkl.partial')
    for leftover in (partial, new_pkl):
        if os.path.lexists(leftover):
            if os.path.isdir(leftover) and not os.path.islink(leftover):
                shutil.rmtree(leftover)
            else:
                os.remove(leftover)
            if verbose:
                print(f'removed {leftover}: the incomplete output of an interrupted run')
    os.makedirs(partial)
    try:
        how = write_images(items, names, partial, link=link)
        write_partitions(partitions, new_pkl)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if os.path.lexists(new_pkl):
            os.remove(new_pkl)
        raise
    _swap_in(save_dir, partial, new_pkl)
    stats = compute_stats(items)
    if verbose:
        print(format_stats(dataset, stats, partitions))
        print(f'{len(items)} images in {images} ({how["linked"]} hard links, {how["copied"]} copies, '
              f'{how["encoded"]} encoded); partitions in {os.path.join(save_dir, "partitions.pkl")}')
    if expected:
        problems = check_counts(stats, expected, dataset)
        if verbose and not problems:
            print(f'official counts check: OK ({", ".join(f"{k}={v}" for k, v in expected.items())})')
    return partitions


# ----------------------------------------------------------------------------- Market-1501 layout

def _walk_dirs(raw, max_depth=3):
    """Folders under raw, breadth first, down to max_depth levels (macOS __MACOSX skipped)."""
    level = [raw]
    for _ in range(max_depth + 1):
        yield from level
        level = [e.path for d in level for e in sorted(os.scandir(d), key=lambda e: e.name)
                 if e.is_dir() and e.name != '__MACOSX']


def _list_market_root(raw, subset=None):
    """Finds the folder holding bounding_box_train/ bounding_box_test/ query/ (gt_bbox/ optional),
    optionally below a subset folder (CUHK03-NP 'labeled'/'detected'), in a folder or a zip.
    Returns {subdir: sorted list of (basename, src)}."""
    required = ('bounding_box_train', 'bounding_box_test', 'query')
    want = [s for s in MARKET_SUBDIRS]
    if zipfile.is_zipfile(raw):
        files = defaultdict(list)  # dir path in zip -> [member]
        with zipfile.ZipFile(raw) as zf:
            for member in zf.namelist():
                if member.endswith('/') or member.startswith('__MACOSX/'):
                    continue
                files[os.path.dirname(member)].append(member)
        parents = {os.path.dirname(d) for d in files if os.path.basename(d) == 'bounding_box_train'}
        if subset:
            parents = {p for p in parents if os.path.basename(p) == subset}
        if not parents:
            where = f"{subset}/bounding_box_train/" if subset else "bounding_box_train/"
            raise ValueError(f"{raw}: the zip holds no '{where}' folder (expected the Market-1501 layout)")
        root = min(parents, key=len)
        result = {}
        for sub in want:
            d = f'{root}/{sub}' if root else sub
            if d not in files:
                if sub in required:
                    raise ValueError(f'{raw}: missing subfolder {d}/ in the zip')
                continue
            result[sub] = sorted((os.path.basename(m), ZipMember(raw, m)) for m in files[d])
        return result
    if os.path.exists(raw) and not os.path.isdir(raw):
        raise ValueError(f'{raw} is neither a folder nor a zip archive (a damaged or partial download?); '
                         'give the downloaded .zip or the extracted folder')
    if not os.path.isdir(raw):
        raise FileNotFoundError(f'raw dataset not found: {raw}')
    dirs = list(_walk_dirs(raw))
    roots = [d for d in dirs if os.path.isdir(os.path.join(d, 'bounding_box_train'))
             and (not subset or os.path.basename(d) == subset)]
    if not roots:
        partial = [d for d in dirs if any(os.path.isdir(os.path.join(d, s)) for s in required)
                   and (not subset or os.path.basename(d) == subset)]
        base = partial[0] if partial else os.path.join(raw, subset or '')
        missing = [s for s in required if not os.path.isdir(os.path.join(base, s))]
        raise ValueError(f'{raw}: wrong layout, missing subfolder '
                         + ', '.join(os.path.join(base, s) + '/' for s in missing)
                         + ' (expected bounding_box_train/, bounding_box_test/, query/)')
    root = roots[0]
    result = {}
    for sub in want:
        d = os.path.join(root, sub)
        if not os.path.isdir(d):
            if sub in required:
                raise ValueError(f'{raw}: wrong layout, missing subfolder {d}/')
            continue
        result[sub] = sorted((e.name, e.path) for e in os.scandir(d) if e.is_file())
    return result


def market_layout_items(raw, subset=None, use_gt_bbox=True):
    """Items of a Market-1501-layout dataset (folder or zip). Junk (id -1) is dropped, distractors
    (id 0) stay in the gallery, gt_bbox/ images are kept only for the (id, camera) pairs of the
    queries (multi-query). Returns (items, num_junk)."""
    listing = _list_market_root(raw, subset)
    items, junk = [], 0
    for sub, split in MARKET_SUBDIRS.items():
        if sub not in listing or (split == 'multi_query' and not use_gt_bbox):
            continue
        n_before = len(items)
        for base, src in listing[sub]:
            if not is_image_name(base):
                continue
            try:
                pid, cam = parse_market_name(base)
            except ValueError as e:
                raise ValueError(f'{sub}/{base}: {e}') from None
            if pid == -1:
                junk += 1
                continue
            if pid == 0 and split != 'gallery':
                raise ValueError(f'{sub}/{base}: distractor id 0000 outside bounding_box_test/')
            items.append(Item(src, pid, cam, split))
        if len(items) == n_before and split != 'multi_query':
            raise ValueError(f'{raw}: subfolder {sub}/ holds no usable images')
    query_pairs = {(it.pid, it.cam) for it in items if it.split == 'query'}
    items = [it for it in items if it.split != 'multi_query' or (it.pid, it.cam) in query_pairs]
    return items, junk


def prepare_market_layout(raw, save_dir, dataset='market1501', overwrite=False, num_val_ids=100,
                          seed=1, expected=None, use_gt_bbox=True, subset=None, link=True,
                          verbose=True, skip_bad_images=False):
    """Prepares a dataset in the Market-1501 layout (zip file or folder; Market-1501, DukeMTMC-reID,
    CUHK03-NP with subset='labeled'|'detected', the synthetic set) into <save_dir>/images/ and
    <save_dir>/partitions.pkl; the raw input is never modified. Prints the statistics table and,
    when expected is given (a dict of compute_stats counts), warns for each count that differs.
    Undecodable images stop it with their list, or are left out with skip_bad_images.
    Returns the partitions dict."""
    raw = os.path.abspath(os.path.expanduser(raw))
    if not os.path.exists(raw):
        raise FileNotFoundError(f'raw dataset not found: {raw}')
    check_save_dir(save_dir, overwrite, raw_paths=(raw,))  # before the (long) reading of the input
    items, junk = market_layout_items(raw, subset=subset, use_gt_bbox=use_gt_bbox)
    if verbose and junk:
        print(f'{dataset}: dropped {junk} junk images (id -1)')
    return write_prepared(items, save_dir, dataset, overwrite=overwrite, num_val_ids=num_val_ids,
                          seed=seed, expected=expected, link=link, raw_paths=(raw,), verbose=verbose,
                          skip_bad_images=skip_bad_images)


def resolve_raw(raw_dir, zip_file, default_dir, default_zip):
    """The raw input a prepare script uses: --raw_dir, else --zip_file, else the extracted default
    folder when it exists, else the default zip. FileNotFoundError naming what was looked for."""
    for path in (raw_dir, zip_file):
        if path:
            path = os.path.expanduser(path)
            if not os.path.exists(path):
                raise FileNotFoundError(f'raw dataset not found: {path}')
            return path
    for path in (default_dir, default_zip):
        if path and os.path.exists(os.path.expanduser(path)):
            return os.path.expanduser(path)
    raise FileNotFoundError(f'raw dataset not found: looked for {default_dir} and {default_zip}; '
                            'download it there or pass --raw_dir / --zip_file')


def add_common_arguments(parser, default_dir, zip_name=None, folder_name=None, val=True):
    """The flags every prepare script shares: --zip_file or --raw_dir (not both), --save_dir,
    --overwrite, --copy, --skip_bad_images and (val=True) --num_val_ids, --seed."""
    raw = parser.add_mutually_exclusive_group()  # argparse refuses both, naming the two flags
    if zip_name:
        raw.add_argument('--zip_file', default=None,
                            help=f'the downloaded zip (default: {default_dir}/{zip_name}, used when '
                                 'the extracted folder is absent)')
    if folder_name:
        raw.add_argument('--raw_dir', default=None,
                            help=f'the extracted folder (default: {default_dir}/{folder_name} when it exists)')
    parser.add_argument('--save_dir', default=default_dir, help='output folder (default: %(default)s)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing prepared set; the new one is built beside it and swapped '
                             'in when complete (default: refuse)')
    parser.add_argument('--skip_bad_images', action='store_true',
                        help='leave out input images that cannot be decoded and print their count and names '
                             '(default: stop with the list of them)')
    parser.add_argument('--copy', action='store_true',
                        help='copy images instead of hard-linking them (default: hard link when possible)')
    if val:
        parser.add_argument('--num_val_ids', type=int, default=100,
                            help='training identities held out for validation (default: %(default)s)')
        parser.add_argument('--seed', type=int, default=1,
                            help='seed of the validation split (default: %(default)s)')


INTERRUPTED = ('interrupted: nothing half-written is left (a set prepared before is intact); rerun the same '
               'command to start again')


def run_cli(main):
    """Runs a prepare script's main(); a bad input ends it with the one-line message, no traceback. A
    folder that cannot be written (no permission, a full disk, a file in the path) is named; the
    previous prepared set, if any, is intact (write_prepared swaps only a complete new set in). Ctrl-C
    ends it with one line (exit status 130), the partial output already removed."""
    try:
        main()
    except KeyboardInterrupt:
        print(f'\nerror: {INTERRUPTED}', file=sys.stderr)
        sys.exit(130)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        sys.exit(f'error: {e}')
    except OSError as e:
        if e.filename is None and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f'{e.filename}: ' if e.filename else ''
        sys.exit(f'error: {where}{e.strerror or e}; a set prepared there before is intact')
