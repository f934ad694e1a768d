"""Fixtures and helpers shared by the test files: the tiny prepared sets, the script loader, the argparse
error of a script, a free port, train.py run in this process, the hand-built Market-1501 tree, and the
brute-force distance references. pytest puts tests/ on sys.path, so the plain helpers are imported with
`from conftest import ...`."""
import functools
import hashlib
import importlib.util
import itertools
import math
import os
import pathlib
import socket
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from aligned_reid.prepare import prepare_market_layout
from aligned_reid.synthetic import render_market_tree

REPO = pathlib.Path(__file__).resolve().parents[1]

# train.py settings of a CPU-sized run on the tiny sets below: resnet18 at 64 x 32, 4 ids x 2 images.
TINY = ['--base_model', 'resnet18', '--resize_h_w', '64', '32', '--ids_per_batch', '4', '--ims_per_id', '2',
        '--pretrained', 'false', '--workers', '0', '--seed', '3', '--device', 'cpu']


@pytest.fixture(scope="module")
def one_torch_thread():
    """Runs a module's tests with one torch thread, restoring the count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- tiny prepared sets

@pytest.fixture(scope='session')
def world(tmp_path_factory):
    """A home folder holding two tiny prepared sets at the default places (~/Dataset/market1501 and
    ~/Dataset/duke: 10 training ids, 6 test ids, 3 cameras, 64 x 32 images), the README's
    AlignedReID/script folder, a torch hub cache whose resnet18 "ImageNet" weights are random, and an
    environment pointing at them. Rendered once per session: the sets are read-only, and a test that
    changes one works on a copy (the README commands write their experiment under world['exp'])."""
    root = tmp_path_factory.mktemp('scripts')
    home = root / 'home'
    for name, seed in (('market1501', 0), ('duke', 1)):
        raw = root / ('raw_' + name)
        render_market_tree(str(raw), num_train_ids=10, num_test_ids=6, ims_per_id_cam=2, num_cams=3,
                           im_size=(64, 32), seed=seed)
        prepare_market_layout(str(raw), str(home / 'Dataset' / name), dataset=name, num_val_ids=2, verbose=False)
    script_dir = root / 'AlignedReID' / 'script'
    script_dir.mkdir(parents=True)
    for name in ('train.py', 'test.py'):
        (script_dir / name).symlink_to(REPO / 'script' / name)
    # torchvision looks in $TORCH_HOME/hub/checkpoints before it downloads: a (random) resnet18 state
    # dict under the official file name stands in for the ImageNet weights, no network needed.
    torch_home = root / 'torch_home'
    (torch_home / 'hub' / 'checkpoints').mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(),
               torch_home / 'hub' / 'checkpoints' / os.path.basename(
                   torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url))
    env = dict(os.environ, HOME=str(home), TORCH_HOME=str(torch_home), PYTHONUNBUFFERED='1',
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))
    return {'root': root, 'home': home, 'env': env,
            'market': str(home / 'Dataset' / 'market1501' / 'partitions.pkl'),
            'duke': str(home / 'Dataset' / 'duke' / 'partitions.pkl'),
            'exp': script_dir / 'exp' / 'train' / 'market1501'}


@pytest.fixture(scope='session')
def market_with_raw(tmp_path_factory):
    """A tiny Market-1501 set prepared from its synthetic raw tree, both kept: 8 training ids, 5 test ids,
    3 cameras, 64 x 32 images. A second set beside `world`'s because the counts differ and the tests say
    them: test_interop.py asserts the 8 training classes ('5 classes in the file, 8 here') and compares the
    prepared images with the raw tree, while world's users assert its 10 identities ('--ids_per_batch 32
    exceeds the 10 identities'). Read-only."""
    root = tmp_path_factory.mktemp('interop')
    raw = root / 'raw'
    render_market_tree(str(raw), num_train_ids=8, num_test_ids=5, ims_per_id_cam=2, num_cams=3, im_size=(64, 32),
                       seed=4)
    prepare_market_layout(str(raw), str(root / 'market1501'), num_val_ids=2, verbose=False)
    return {'root': root, 'raw': raw, 'partitions': str(root / 'market1501' / 'partitions.pkl')}


# ----------------------------------------------------------------------------- scripts

def load_script(folder, name):
    """The module of REPO/folder/name.py, e.g. load_script('data_set', 'market1501_prepare') (the scripts
    are files, not a package)."""
    spec = importlib.util.spec_from_file_location(f'{folder}_{name}', REPO / folder / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_error(module, argv, capsys):
    """The stderr of a script's parse_args(argv) that stops with argparse's error (exit code 2)."""
    with pytest.raises(SystemExit) as e:
        module.parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@functools.lru_cache(maxsize=None)
def _train_script():
    return load_script('script', 'train')


def main_with_fit(script, argv, fit):
    """Runs a training script's main(argv) in this process with aligned_reid.engine.fit, the epoch loop,
    replaced by `fit` (called with fit's arguments): what main hands to the loop, without training."""
    from aligned_reid import engine
    mp = pytest.MonkeyPatch()
    mp.setattr(engine, 'fit', fit)
    try:
        script.main(script.parse_args(argv))
    finally:
        mp.undo()


def train_in_process(argv, compute=None):
    """Runs train.py's main in this process; returns the per-step losses its loss function (`compute`,
    default loss.compute_losses) produced."""
    from aligned_reid.loss import compute_losses
    train_script = _train_script()
    seen = []

    def recording(outputs, labels, **kw):
        result = (compute or compute_losses)(outputs, labels, **kw)
        seen.append(float(result['loss'].detach()))
        return result
    args = train_script.parse_args(argv)
    try:
        train_script.main(args, compute=recording)
    finally:
        seen_copy = list(seen)
    return seen_copy


# ----------------------------------------------------------------------------- a hand-built Market-1501 tree

def save_image(path, value):
    """A tiny JPEG whose colour encodes `value`, so copies can be traced back to their source."""
    Image.new('RGB', (4, 8), (value % 256, (value // 256) % 256, 7)).save(path, quality=100)


def build_market_tree(root):
    """A Market-1501-like tree: 6 train ids over 3 cameras, 4 test ids, a distractor, junk,
    gt_bbox for query and non-query pairs, and stray files. Returns {relative path: value}."""
    top = root / 'Market-1501-v15.09.15'
    for sub in ('bounding_box_train', 'bounding_box_test', 'query', 'gt_bbox'):
        (top / sub).mkdir(parents=True)
    files = {}
    value = 0

    def add(sub, name):
        nonlocal value
        value += 1
        save_image(top / sub / name, value)
        files[f'{sub}/{name}'] = value

    for pid in (2, 7, 11, 12, 30, 31):
        for cam in (1, 2, 3):
            for j in range(1 + (pid + cam) % 3):
                add('bounding_box_train', f'{pid:04d}_c{cam}s{cam}_{100 * j + pid:06d}_0{j + 1}.jpg')
    for pid in (40, 41, 42, 43):
        for cam in (1, 4, 6):
            if pid == 43 and cam == 6:
                continue
            add('query', f'{pid:04d}_c{cam}s2_{pid:06d}_00.jpg')
            add('bounding_box_test', f'{pid:04d}_c{cam}s2_{pid + 5:06d}_01.jpg')
            add('bounding_box_test', f'{pid:04d}_c{cam}s3_{pid + 9:06d}_02.jpg')
            add('gt_bbox', f'{pid:04d}_c{cam}s2_{pid + 1:06d}_00.jpg')
        add('gt_bbox', f'{pid:04d}_c5s1_{pid:06d}_00.jpg')  # camera without a query: not used
    add('gt_bbox', '0002_c1s1_000001_00.jpg')  # a training id: not used
    for name in ('0000_c1s1_000001_00.jpg', '0000_c3s4_123456_00.jpg', '0000_c6s1_000002_00.jpg'):
        add('bounding_box_test', name)
    for name in ('-1_c1s1_000401_03.jpg', '-1_c4s2_000002_01.jpg'):
        add('bounding_box_test', name)
    for sub in ('bounding_box_train', 'bounding_box_test', 'query', 'gt_bbox'):
        (top / sub / 'Thumbs.db').write_bytes(b'\x00junk')
    (top / 'bounding_box_test' / '._0040_c1s2_000045_01.jpg').write_bytes(b'apple double')
    (top / 'bounding_box_test' / '.DS_Store').write_bytes(b'x')
    (top / 'readme.txt').write_text('Market-1501')
    return files


def tree_digest(root):
    """{relative path: (sha1 or 'dir', mode, mtime)} of everything under root, to show a tree untouched."""
    out = {}
    for p in sorted(pathlib.Path(root).rglob('*')):
        st = p.lstat()
        data = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else 'dir'
        out[str(p.relative_to(root))] = (data, st.st_mode, st.st_mtime_ns if p.is_file() else 0)
    return out


# ----------------------------------------------------------------------------- brute-force distances

def brute_shortest_path(grid):
    """Minimum over every right/down path of the cell sum, by enumeration ([m, n] -> float)."""
    m, n = grid.shape
    best = math.inf
    for downs in itertools.combinations(range(m + n - 2), m - 1):
        i = j = 0
        total = grid[0, 0].item()
        for step in range(m + n - 2):
            if step in downs:
                i += 1
            else:
                j += 1
            total += grid[i, j].item()
        best = min(best, total)
    return best


def brute_local_dist(a, b, aligned=True):
    """Local distance of one pair of stripe sets a [m, d], b [n, d] (tensors or arrays) by plain loops in
    float64: stripe distances d mapped by (e^d - 1) / (e^d + 1), then the cheapest right/down path through
    them (aligned) or the sum of the diagonal (not aligned)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    m, n = a.shape[0], b.shape[0]
    grid = torch.empty(m, n, dtype=torch.float64)
    for i in range(m):
        for j in range(n):
            d = (a[i] - b[j]).pow(2).sum().sqrt().item()
            grid[i, j] = (math.exp(d) - 1) / (math.exp(d) + 1)
    if not aligned:
        return sum(grid[i, i].item() for i in range(m))
    return brute_shortest_path(grid)


def brute_global_dist(q, g, normalize=False):
    """Euclidean distances of arrays q [Q, d] and g [G, d] in float64 -> [Q, G]; rows made unit length
    first when `normalize`."""
    if normalize:
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return np.sqrt(((q[:, None, :].astype(np.float64) - g[None]) ** 2).sum(-1))


def brute_dist(q, g, distance):
    """Query x gallery distances [Q, G] of feature dicts ('global' [N, d], 'local' [N, m, d]) for
    distance 'global', 'local' or 'global_local' (their sum)."""
    out = 0.
    if distance in ('global', 'global_local'):
        out = out + brute_global_dist(q['global'], g['global'])
    if distance in ('local', 'global_local'):
        out = out + np.array([[brute_local_dist(a, b) for b in g['local']] for a in q['local']])
    return out
