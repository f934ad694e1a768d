"""Benchmark: preparation of fake raw datasets of full official size (real counts, tiny 8x4 JPEGs, or
--im_size 128 64 for Market-1501's real image size) for Market-1501 (folder and zip), DukeMTMC-reID, MSMT17 and
CUHK03; prints the time, the ratio to a bare hard-link loop over the same files (the baseline, run in the same
process), the share of the time spent decoding every input image, and the official-counts check.
Run: python bench/prepare_full_size.py [--datasets market1501 duke msmt17 cuhk03] [--im_size 128 64]"""
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile

import numpy as np
from PIL import Image

from aligned_reid import cli
from aligned_reid.prepare import OFFICIAL_COUNTS, market_layout_items, prepare_market_layout, write_prepared

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_prepare_script(name, raw, save):
    """data_set/<name>.py on `raw` as a user runs it, in a child process whose count warnings are errors.
    Returns (seconds of the preparation alone, the interpreter's start-up and imports subtracted; whether
    the official counts matched)."""
    command = [sys.executable, '-W', 'error::UserWarning', os.path.join(REPO, 'data_set', name + '.py'),
               '--raw_dir', raw, '--save_dir', save]
    start = [sys.executable, '-c', 'import aligned_reid.prepare']
    t = time.perf_counter()
    subprocess.run(start, check=True)
    t_start = time.perf_counter() - t
    t = time.perf_counter()
    r = subprocess.run(command, capture_output=True, text=True)
    t_prep = time.perf_counter() - t - t_start
    if r.returncode:
        print(r.stdout + r.stderr)
    return t_prep, r.returncode == 0


IM_SIZE = (8, 4)  # height, width of the fake images; --im_size sets it


def tiny_jpeg():
    """One JPEG of IM_SIZE: a flat colour at 8 x 4; at larger sizes a textured picture (smooth shading
    plus noise) that compresses like a pedestrian crop, about 4-5 KB at 128 x 64."""
    h, w = IM_SIZE
    buf = io.BytesIO()
    if (h, w) == (8, 4):
        Image.new('RGB', (w, h), (120, 30, 200)).save(buf, format='JPEG')
    else:
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([128 + 80 * np.sin(y / 9.0), 100 + 60 * np.cos(x / 7.0), 90 + 0.5 * y], -1)
        im = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(im).save(buf, format='JPEG', quality=90)
    return buf.getvalue()


def spread(total, n):
    """n counts summing to total, as even as possible."""
    return [total // n + (i < total % n) for i in range(n)]


class Tree:
    """Writes distinct tiny files (hard links of one file would hit the file system's link limit)."""

    def __init__(self, root):
        self.root, self.data, self.count = root, tiny_jpeg(), 0

    def add(self, rel):
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(self.data)
        self.count += 1


def fake_market(root, ids_train=751, n_train=12936, ids_test=750, n_query=3368, n_gallery=13115,
                n_distractor=2798, n_junk=3819, n_gt_bbox=25259, num_cams=6, frame_name=True):
    """The Market-1501 layout with the official counts (Duke: frame_name=False, 'c2_f0046182' names)."""
    tree = Tree(root)

    def name(pid, cam, j):
        if frame_name:
            return f'{pid:04d}_c{cam}s1_{j:06d}_01.jpg' if pid >= 0 else f'-1_c{cam}s1_{j:06d}_01.jpg'
        return f'{pid:04d}_c{cam}_f{j:07d}.jpg'

    for i, n in enumerate(spread(n_train, ids_train)):
        for j in range(n):
            tree.add(f'bounding_box_train/{name(2 * i + 2, (i + j) % num_cams + 1, j)}')
    test_pids = [2 * i + 3 for i in range(ids_test)]
    query_cams = {}
    per_id = spread(n_query, ids_test)
    for pid, n in zip(test_pids, per_id):
        query_cams[pid] = [(pid + c) % num_cams + 1 for c in range(min(n, num_cams))]
        for j in range(n):
            tree.add(f'query/{name(pid, query_cams[pid][j % len(query_cams[pid])], 900000 + j)}')
    for pid, n in zip(test_pids, spread(n_gallery, ids_test)):
        for j in range(n):
            tree.add(f'bounding_box_test/{name(pid, (pid + j + 1) % num_cams + 1, j)}')
    for j in range(n_distractor):
        tree.add(f'bounding_box_test/{name(0, j % num_cams + 1, j)}')
    for j in range(n_junk):
        tree.add(f'bounding_box_test/{name(-1, j % num_cams + 1, j)}')
    for j in range(n_gt_bbox):
        pid = test_pids[j % ids_test]
        tree.add(f'gt_bbox/{name(pid, query_cams[pid][j % len(query_cams[pid])], 500000 + j)}')
    return tree.count


def fake_msmt17(root):
    """MSMT17_V1: train/ test/ and the four list files, official counts, 15 cameras."""
    tree = Tree(root)
    lists = {'list_train.txt': [], 'list_val.txt': [], 'list_query.txt': [], 'list_gallery.txt': []}
    vals = spread(2373, 1041)  # list_val.txt: the last 2-3 images of every training identity
    for label, n in enumerate(spread(32621, 1041)):
        for j in range(n):
            rel = f'{label:04d}/{label:04d}_{j:03d}_{(label + j) % 15 + 1:02d}_0303morning_{j:04d}_0.jpg'
            tree.add(f'train/{rel}')
            lists['list_val.txt' if j >= n - vals[label] else 'list_train.txt'].append(f'{rel} {label}')
    q, g = spread(11659, 3060), spread(82161, 3060)
    for label in range(3060):
        for j in range(q[label] + g[label]):
            rel = f'{label:04d}/{label:04d}_{j:03d}_{(label + j) % 15 + 1:02d}_0113noon_{j:04d}_0.jpg'
            tree.add(f'test/{rel}')
            lists['list_query.txt' if j < q[label] else 'list_gallery.txt'].append(f'{rel} {label}')
    for name, lines in lists.items():
        with open(os.path.join(root, name), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    return tree.count


def fake_cuhk03(root):
    """cuhk03_release/cuhk-03.mat (HDF5 object references like MATLAB v7.3) with 1,467 identities over
    5 camera pairs, plus new-protocol files with the official counts."""
    import h5py
    from scipy.io import savemat
    persons = (843, 440, 77, 58, 49)
    targets = {'labeled': (7368, 1400, 5328), 'detected': (7365, 1400, 5332)}
    os.makedirs(os.path.join(root, 'cuhk03_release'))
    im = np.full((3, 4, 8), 100, np.uint8)  # stored transposed: 8 x 4 x 3 image
    with h5py.File(os.path.join(root, 'cuhk03_release', 'cuhk-03.mat'), 'w') as f:
        refs = f.create_group('#refs#')
        full = refs.create_dataset('im', data=im).ref
        empty = refs.create_dataset('empty', data=np.zeros(2, np.uint64)).ref
        for t, (n_train, n_query, n_gallery) in targets.items():
            train_empty = 767 * 10 - n_train
            test_empty = 700 * 10 - n_query - n_gallery
            cells, names, split, labels = [], [], [], []
            gid = 0
            for pair, n in enumerate(persons):
                cell = np.empty((n, 10), dtype=h5py.ref_dtype)
                for person in range(n):
                    is_train = gid < 767
                    k = gid if is_train else gid - 767
                    n_empty = train_empty if is_train else test_empty
                    for slot in range(10):
                        # empties at slots 4 and 9 of the first persons; slots 0 and 5 (queries) never
                        hole = (slot == 4 and k < (n_empty + 1) // 2) or (slot == 9 and k < n_empty // 2)
                        cell[person, slot] = empty if hole else full
                        if not hole:
                            names.append(f'{pair + 1}_{person + 1:03d}_{slot // 5 + 1}_{slot + 1:02d}.png')
                            split.append('train' if is_train else ('query' if slot in (0, 5) else 'gallery'))
                            labels.append(gid + 1)
                    gid += 1
                cells.append(refs.create_dataset(f'{t}{pair}', data=cell.T).ref)
            f.create_dataset(t, data=np.array([cells], dtype=h5py.ref_dtype))
            filelist = np.empty((len(names), 1), dtype=object)
            filelist[:, 0] = names
            idx = {s: np.array([i + 1 for i, x in enumerate(split) if x == s], np.float64)[:, None]
                   for s in ('train', 'query', 'gallery')}
            savemat(os.path.join(root, f'cuhk03_new_protocol_config_{t}.mat'), dict(
                filelist=filelist, labels=np.array(labels, np.float64)[:, None], camId=np.zeros((len(names), 1)),
                train_idx=idx['train'], query_idx=idx['query'], gallery_idx=idx['gallery']))
        f.create_dataset('testsets', data=np.array([[refs.create_dataset('ts', data=np.ones((2, 100))).ref]],
                                                   dtype=h5py.ref_dtype))
    return 14096 + 14097


def baseline_links(src_root, dst):
    """The baseline: hard-link every file of the raw tree into one folder, nothing else."""
    os.makedirs(dst)
    t = time.perf_counter()
    n = 0
    for dirpath, _, filenames in os.walk(src_root):
        for name in filenames:
            os.link(os.path.join(dirpath, name), os.path.join(dst, f'{n:08d}'))
            n += 1
    return time.perf_counter() - t


def baseline_zip_read(zip_path):
    """The baseline for a zip input: read every member once, nothing else."""
    t = time.perf_counter()
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            zf.read(info)
    return time.perf_counter() - t


def make_zip(folder, zip_path):
    with zipfile.ZipFile(zip_path, 'w', zipfile.ZIP_DEFLATED) as zf:
        for dirpath, _, filenames in os.walk(folder):
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                zf.write(path, os.path.relpath(path, os.path.dirname(folder)))


def run(name, work):
    raw = os.path.join(work, name + '_raw')
    save = os.path.join(work, name)
    t = time.perf_counter()
    if name == 'market1501':
        n_files = fake_market(os.path.join(raw, 'Market-1501-v15.09.15'))
    elif name == 'market1501_zip':
        n_files = fake_market(os.path.join(work, 'Market-1501-v15.09.15'))
        make_zip(os.path.join(work, 'Market-1501-v15.09.15'), raw + '.zip')
        shutil.rmtree(os.path.join(work, 'Market-1501-v15.09.15'))
        raw += '.zip'
    elif name == 'duke':
        n_files = fake_market(os.path.join(raw, 'DukeMTMC-reID'), ids_train=702, n_train=16522, ids_test=1110,
                              n_query=2228, n_gallery=17661, n_distractor=0, n_junk=0, n_gt_bbox=0,
                              num_cams=8, frame_name=False)
    elif name == 'msmt17':
        n_files = fake_msmt17(os.path.join(raw, 'MSMT17_V1'))
    else:
        n_files = fake_cuhk03(raw)
    t_make = time.perf_counter() - t
    if name == 'cuhk03':
        t_base = None
    elif name == 'market1501_zip':
        t_base = baseline_zip_read(raw)
    else:
        t_base = baseline_links(raw, os.path.join(work, name + '_baseline'))
    t_unchecked = None
    if name in ('market1501', 'market1501_zip', 'duke'):  # the same preparation without the decode check
        key = 'market1501' if name == 'market1501_zip' else name
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            t = time.perf_counter()
            items, _ = market_layout_items(raw, use_gt_bbox=True)
            write_prepared(items, save + '_unchecked', key, num_val_ids=100, check_images=False, verbose=False)
            t_unchecked = time.perf_counter() - t
    if name in ('market1501', 'market1501_zip', 'duke'):
        key = 'market1501' if name == 'market1501_zip' else name
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            t = time.perf_counter()
            prepare_market_layout(raw, save, dataset=key, expected=OFFICIAL_COUNTS[key], use_gt_bbox=True)
            t_prep = time.perf_counter() - t
        for w in caught:
            print(f'WARNING: {w.message}')
        counts_ok = not caught
    else:  # their preparation lives in the data_set scripts: run them as a user does
        t_prep, counts_ok = run_prepare_script('msmt17_prepare' if name == 'msmt17' else 'cuhk03_prepare', raw, save)
    what = 'reading every zip member' if name.endswith('_zip') else 'the bare hard-link loop'
    ratio = f', {t_prep / t_base:.1f}x {what} ({t_base:.1f} s)' if t_base else ''
    decode = (f'; without the decode check of its {len(items)} input images {t_unchecked:.1f} s (the check: '
              f'+{t_prep - t_unchecked:.1f} s, {t_prep / t_unchecked:.2f}x)' if t_unchecked else '')
    print(f'== {name}: {n_files} raw files of {IM_SIZE[0]} x {IM_SIZE[1]} (made in {t_make:.1f} s); '
          f'preparation {t_prep:.1f} s{ratio}{decode}; official counts {"OK" if counts_ok else "MISMATCH"}\n', flush=True)
    return t_prep, counts_ok


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument('--datasets', nargs='+', default=['market1501', 'market1501_zip', 'duke', 'msmt17', 'cuhk03'],
                   choices=['market1501', 'market1501_zip', 'duke', 'msmt17', 'cuhk03'],
                   help='market1501_zip: Market-1501 from its zip (default: all)')
    p.add_argument('--work_dir', default=None, help='where the fake trees go (default: a temporary folder, removed)')
    p.add_argument('--im_size', type=int, nargs=2, default=[8, 4], metavar=('H', 'W'),
                   help='size of the fake JPEGs; 128 64 is Market-1501\'s (default: 8 4)')
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    global IM_SIZE
    IM_SIZE = tuple(args.im_size)
    print(f'fake images: {IM_SIZE[0]} x {IM_SIZE[1]}, {len(tiny_jpeg())} bytes each')
    work = args.work_dir or tempfile.mkdtemp(prefix='prepare-bench-')
    try:
        results = {name: run(name, work) for name in args.datasets}
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    ok = all(r[1] for r in results.values())
    print('summary: ' + ', '.join(f'{n} {t:.1f} s' for n, (t, _) in results.items())
          + ('; all official counts match' if ok else '; SOME COUNTS DIFFER'))
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
