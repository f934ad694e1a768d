"""Prepares CUHK03 into <save_dir>/labeled/ and <save_dir>/detected/ (images/ + partitions.pkl each), from
cuhk03_release (cuhk-03.mat, MATLAB v7.3) with the new (CUHK03-NP) or classic split, or from the CUHK03-NP
folders. Run: cd data_set && python cuhk03_prepare.py"""
import os
import re
import shutil
import tempfile
import zipfile
from collections import defaultdict

import numpy as np

from aligned_reid import cli
from aligned_reid.prepare import (OFFICIAL_COUNTS, Item, add_common_arguments, check_save_dir,
                                  prepare_market_layout, run_cli, val_marks_for_identity,
                                  write_prepared)

DEFAULT_DIR = os.path.join('~', 'Dataset', 'cuhk03')
ZIP_NAME = 'cuhk03_release.zip'
FOLDER_NAME = 'cuhk03_release'
MAT_NAME = 'cuhk-03.mat'
PROTOCOL_NAME = 'cuhk03_new_protocol_config_{}.mat'
IMAGE_TYPES = ('labeled', 'detected')
SLOTS = 10  # image slots per person: 1-5 from the pair's first camera, 6-10 from its second
PROTOCOL_FIELDS = ('filelist', 'labels', 'camId', 'train_idx', 'query_idx', 'gallery_idx')
PROTOCOL_NAME_RE = re.compile(r'(\d+)_(\d+)_([12])_(\d+)\.\w+')  # pair_person_view_slot.png
CLASSIC_COUNTS = dict(trainval_ids=1367, test_ids=100)


def camera(pair, slot):
    """Camera id, distinct per camera pair: pair 0 -> 1, 2; pair 4 -> 9, 10 (pair, slot 0-based)."""
    return 2 * pair + slot // 5 + 1


class MatImage:
    """Lazy loader of one image of cuhk-03.mat: the HDF5 array transposed to H x W x 3 uint8."""

    def __init__(self, f, ref, where):
        self.f, self.ref, self.where = f, ref, where

    def __call__(self):
        im = self.f[self.ref][()].T
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(f'{self.where}: expected an H x W x 3 uint8 image, got {im.dtype} {im.shape}')
        return np.ascontiguousarray(im)


def read_cuhk03_mat(f, image_type, mat_path):
    """Images of one type in an open cuhk-03.mat (h5py.File). Returns (images, persons_per_pair) where
    images maps (pair, person, slot), all 0-based, to a MatImage; empty slots are absent."""
    if image_type not in f:
        raise ValueError(f'{mat_path}: no dataset {image_type!r} (expected {", ".join(IMAGE_TYPES)})')
    images, persons_per_pair = {}, []
    for pair, cell_ref in enumerate(np.asarray(f[image_type][()]).ravel()):
        cell = np.asarray(f[cell_ref][()]).T  # [persons, 10] references (MATLAB is column-major)
        if cell.ndim != 2 or cell.shape[1] != SLOTS:
            raise ValueError(f'{mat_path}: {image_type} cell {pair + 1} has shape {cell.shape}, '
                             f'expected persons x {SLOTS}')
        persons_per_pair.append(cell.shape[0])
        for person in range(cell.shape[0]):
            for slot in range(SLOTS):
                ds = f[cell[person, slot]]
                if len(ds.shape) >= 3:  # an empty slot dereferences to a small 2-element array
                    where = f'{mat_path}: {image_type} pair {pair + 1} person {person + 1} slot {slot + 1}'
                    images[pair, person, slot] = MatImage(f, cell[person, slot], where)
    return images, persons_per_pair


def read_testsets(f, mat_path):
    """The 20 classic test splits: list of sets of (pair, person), 0-based."""
    if 'testsets' not in f:
        raise ValueError(f"{mat_path}: no dataset 'testsets' (needed by --split classic)")
    splits = []
    for ref in np.asarray(f['testsets'][()]).ravel():
        arr = np.asarray(f[ref][()]).T  # [100, 2] of (pair, person), 1-based
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"{mat_path}: a 'testsets' cell has shape {arr.shape}, expected N x 2")
        splits.append({(int(a) - 1, int(b) - 1) for a, b in arr})
    return splits


def _as_str(x):
    while isinstance(x, np.ndarray):
        if x.size != 1:
            raise ValueError(f'expected one string, got an array of shape {x.shape}')
        x = x.ravel()[0]
    return str(x)


def read_protocol(path):
    """A v5 cuhk03_new_protocol_config_*.mat (scipy). Returns {'filelist': [str], 'labels': [int],
    'train_idx' / 'query_idx' / 'gallery_idx': 0-based index arrays}."""
    from scipy.io import loadmat
    try:
        mat = loadmat(path)
    except Exception as e:
        raise ValueError(f'{path}: cannot read it as a MATLAB v5 .mat file ({e})') from None
    for field in PROTOCOL_FIELDS:
        if field not in mat:
            raise ValueError(f'{path}: missing field {field!r} (expected {", ".join(PROTOCOL_FIELDS)})')
    filelist = [_as_str(x) for x in np.asarray(mat['filelist']).ravel()]
    out = {'filelist': filelist, 'labels': [int(x) for x in np.asarray(mat['labels']).ravel()]}
    if len(out['labels']) != len(filelist):
        raise ValueError(f"{path}: 'labels' has {len(out['labels'])} entries, 'filelist' {len(filelist)}")
    for field in ('train_idx', 'query_idx', 'gallery_idx'):
        idx = np.asarray(mat[field]).ravel().astype(np.int64) - 1
        if idx.size == 0 or idx.min() < 0 or idx.max() >= len(filelist):
            raise ValueError(f'{path}: {field!r} holds indices outside 1..{len(filelist)}')
        out[field] = idx
    return out


def new_protocol_items(images, persons_per_pair, protocol, protocol_path):
    """Items of the new (CUHK03-NP) protocol: the filelist entries named by train/query/gallery_idx."""
    offsets = np.cumsum([0] + persons_per_pair)
    label_of = {}
    split_items = {}
    for split, field in (('trainval', 'train_idx'), ('query', 'query_idx'), ('gallery', 'gallery_idx')):
        rows = []
        for i in protocol[field]:
            name = protocol['filelist'][i]
            m = PROTOCOL_NAME_RE.fullmatch(name)
            if m is None:
                raise ValueError(f"{protocol_path}: filelist entry {i + 1} {name!r} does not parse "
                                 "(expected pair_person_view_slot.png, e.g. '1_001_1_01.png')")
            pair, person, view, slot = (int(g) - 1 for g in m.groups())
            if not (0 <= slot < SLOTS and view == slot // 5 and 0 <= pair < len(persons_per_pair)
                    and 0 <= person < persons_per_pair[pair]):
                raise ValueError(f'{protocol_path}: filelist entry {i + 1} {name!r} names no image slot '
                                 'of cuhk-03.mat')
            if (pair, person, slot) not in images:
                raise ValueError(f'{protocol_path}: filelist entry {i + 1} {name!r} is an empty slot '
                                 'in cuhk-03.mat (image listed but missing)')
            pid = int(offsets[pair]) + person + 1
            if label_of.setdefault(protocol['labels'][i], pid) != pid:
                raise ValueError(f"{protocol_path}: label {protocol['labels'][i]} of {name!r} is also "
                                 'used for another person')
            rows.append((pid, camera(pair, slot), slot, images[pair, person, slot]))
        split_items[split] = [Item(src, pid, cam, split) for pid, cam, _, src in sorted(rows, key=lambda r: r[:3])]
    return split_items['trainval'] + split_items['query'] + split_items['gallery']


def classic_items(images, persons_per_pair, test_set):
    """Items of the classic split: test identities (pair, person) from 'testsets'; in the test set the
    first image of each camera is a query and the rest gallery (val_marks_for_identity rule)."""
    offsets = np.cumsum([0] + persons_per_pair)
    by_person = defaultdict(list)
    for (pair, person, slot), src in sorted(images.items(), key=lambda kv: kv[0]):
        by_person[pair, person].append((camera(pair, slot), src))
    train, query, gallery = [], [], []
    for (pair, person), ims in sorted(by_person.items()):
        pid = int(offsets[pair]) + person + 1
        if (pair, person) not in test_set:
            train += [Item(src, pid, cam, 'trainval') for cam, src in ims]
            continue
        for (cam, src), mark in zip(ims, val_marks_for_identity([c for c, _ in ims])):
            (query if mark == 0 else gallery).append(Item(src, pid, cam, 'query' if mark == 0 else 'gallery'))
    return train + query + gallery


def _find_file(roots, name, max_depth=2):
    for root in roots:
        if not root or not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            if name in filenames:
                return os.path.join(dirpath, name)
            if dirpath[len(root):].count(os.sep) >= max_depth:
                dirnames[:] = []
    return None


def _extract(zip_path, names, out_dir):
    """Extracts the zip members whose base name is in names into out_dir; returns {name: path}."""
    found = {}
    with zipfile.ZipFile(zip_path) as zf:
        for member in zf.namelist():
            base = os.path.basename(member)
            if base in names and not member.startswith('__MACOSX/') and base not in found:
                found[base] = os.path.join(out_dir, base)
                with zf.open(member) as fin, open(found[base], 'wb') as fout:
                    shutil.copyfileobj(fin, fout)
    return found


def prepare_from_mat(mat_path, save_dir, split='new', split_id=0, protocol_paths=None,
                     image_types=IMAGE_TYPES, overwrite=False, num_val_ids=100, seed=1, link=True,
                     skip_bad_images=False):
    """Prepares <save_dir>/<image_type>/ from cuhk-03.mat. protocol_paths: {image_type: path of
    cuhk03_new_protocol_config_<type>.mat} (split='new'). Returns {image_type: partitions}."""
    import h5py
    if split not in ('new', 'classic'):
        raise ValueError(f"split={split!r}: choose 'new' or 'classic'")
    for t in image_types:
        check_save_dir(os.path.join(save_dir, t), overwrite, raw_paths=(mat_path,))
    if split == 'new':
        protocols = {}
        for t in image_types:
            path = (protocol_paths or {}).get(t)
            if not path or not os.path.isfile(path):
                raise FileNotFoundError(f'new-protocol file {PROTOCOL_NAME.format(t)} not found '
                                        f'({path or "not given"}); pass --protocol_dir or use --split classic')
            protocols[t] = read_protocol(path)
    try:
        f = h5py.File(mat_path, 'r')
    except OSError as e:
        raise ValueError(f'{mat_path}: cannot read it as a MATLAB v7.3 (HDF5) file ({e})') from None
    results = {}
    with f:
        for t in image_types:
            if t not in f:
                raise ValueError(f'{mat_path}: no dataset {t!r} (expected {", ".join(IMAGE_TYPES)})')
        if split == 'classic':
            testsets = read_testsets(f, mat_path)
            if not 0 <= split_id < len(testsets):
                raise ValueError(f'--split_id {split_id}: {mat_path} holds {len(testsets)} classic splits '
                                 f'(0..{len(testsets) - 1})')
        for t in image_types:
            images, persons_per_pair = read_cuhk03_mat(f, t, mat_path)
            if split == 'new':
                items = new_protocol_items(images, persons_per_pair, protocols[t], protocol_paths[t])
                expected = OFFICIAL_COUNTS[f'cuhk03_{t}']
            else:
                items = classic_items(images, persons_per_pair, testsets[split_id])
                expected = CLASSIC_COUNTS
            print(f'cuhk03 {t}: {sum(persons_per_pair)} identities, {len(images)} images in {mat_path}')
            results[t] = write_prepared(items, os.path.join(save_dir, t), f'cuhk03_{t}', overwrite=overwrite,
                                        num_val_ids=num_val_ids, seed=seed, expected=expected, link=link,
                                        raw_paths=(mat_path,), skip_bad_images=skip_bad_images)
    return results


def _is_np_layout(raw):
    """True when raw (folder or zip) holds the CUHK03-NP folders labeled/ and detected/."""
    if zipfile.is_zipfile(raw):
        with zipfile.ZipFile(raw) as zf:
            return any(re.search(r'(^|/)(labeled|detected)/bounding_box_train/', m) for m in zf.namelist())
    return any(os.path.isdir(os.path.join(d, t, 'bounding_box_train'))
               for d in (raw, *[e.path for e in os.scandir(raw) if e.is_dir()]) for t in IMAGE_TYPES)


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    add_common_arguments(p, DEFAULT_DIR, ZIP_NAME, FOLDER_NAME)
    p.add_argument('--split', default='new', choices=('new', 'classic'),
                   help="'new': the CUHK03-NP protocol, 767 train / 700 test ids; 'classic': one of the "
                        "20 1,367 / 100 splits of cuhk-03.mat (default: %(default)s)")
    p.add_argument('--split_id', type=int, default=0, help='classic split, 0..19 (default: %(default)s)')
    p.add_argument('--protocol_dir', default=None,
                   help='folder with cuhk03_new_protocol_config_{labeled,detected}.mat (default: search '
                        'the raw folder or zip, its parent and --save_dir)')
    p.add_argument('--image_types', nargs='+', default=list(IMAGE_TYPES), choices=IMAGE_TYPES,
                   help='which bounding boxes to prepare (default: labeled detected)')
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.split == 'new' and args.split_id != 0:
        p.error('--split_id applies to --split classic only')
    save_dir = os.path.expanduser(args.save_dir)
    raw = args.raw_dir or args.zip_file
    if raw is None:
        candidates = [os.path.join(DEFAULT_DIR, FOLDER_NAME), os.path.join(DEFAULT_DIR, ZIP_NAME),
                      os.path.join(DEFAULT_DIR, 'cuhk03-np')]
        raw = next((c for c in candidates if os.path.exists(os.path.expanduser(c))), None)
        if raw is None:
            raise FileNotFoundError(f'raw dataset not found: looked for {", ".join(candidates)}; '
                                    'download it there or pass --raw_dir / --zip_file')
    raw = os.path.abspath(os.path.expanduser(raw))
    if not os.path.exists(raw):
        raise FileNotFoundError(f'raw dataset not found: {raw}')
    if not os.path.isdir(raw) and not zipfile.is_zipfile(raw):
        raise ValueError(f'{raw} is neither a folder nor a zip archive (a damaged or partial download?); '
                         'give the downloaded .zip or the extracted folder')
    common = dict(overwrite=args.overwrite, num_val_ids=args.num_val_ids, seed=args.seed, link=not args.copy,
                  skip_bad_images=args.skip_bad_images)
    if _is_np_layout(raw):
        if args.split != 'new':
            p.error('the CUHK03-NP folders hold the new protocol only; --split classic needs cuhk-03.mat')
        return {t: prepare_market_layout(raw, os.path.join(save_dir, t), dataset=f'cuhk03_{t}', subset=t,
                                         use_gt_bbox=False, expected=OFFICIAL_COUNTS[f'cuhk03_{t}'], **common)
                for t in args.image_types}
    protocol_names = [PROTOCOL_NAME.format(t) for t in args.image_types]
    search = [args.protocol_dir] if args.protocol_dir else [
        raw if os.path.isdir(raw) else None, os.path.dirname(raw), save_dir]
    tmp = None
    try:
        if zipfile.is_zipfile(raw):
            os.makedirs(save_dir, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix='.cuhk03-extract-', dir=save_dir)
            found = _extract(raw, {MAT_NAME, *protocol_names}, tmp)
            if MAT_NAME not in found:
                raise ValueError(f'{raw}: no {MAT_NAME} in the zip')
            mat_path = found[MAT_NAME]
            search.append(tmp)
        else:
            mat_path = _find_file([raw], MAT_NAME)
            if mat_path is None:
                raise ValueError(f'{raw}: holds neither {MAT_NAME} nor the CUHK03-NP folders labeled/ and '
                                 'detected/ with bounding_box_train/')
        protocol_paths = {t: _find_file(search, PROTOCOL_NAME.format(t)) for t in args.image_types}
        return prepare_from_mat(mat_path, save_dir, split=args.split, split_id=args.split_id,
                                protocol_paths=protocol_paths, image_types=args.image_types, **common)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    run_cli(main)
