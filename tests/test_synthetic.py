"""Tests of the synthetic renderer (aligned_reid/synthetic.py) and data_set/synthetic_prepare.py:
determinism, the Market-1501 layout and names, counts, cross-camera matches, image sizes."""
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aligned_reid.data import parse_im_name, read_partitions, validate_partitions
from aligned_reid.synthetic import (DETECTOR, SUBDIRS, box_iou, make_camera, make_identity,
                                    render_image, render_market_tree, sample_box)
from conftest import load_script

MARKET_RE = re.compile(r'^(-1|\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$')
SMALL = dict(num_train_ids=5, num_test_ids=6, ims_per_id_cam=2, num_cams=4, im_size=(48, 24))


def read_tree(root):
    """{subdir: {name: bytes}}"""
    return {d: {n: (Path(root) / d / n).read_bytes() for n in sorted(os.listdir(Path(root) / d))}
            for d in SUBDIRS}


def parse(name):
    m = MARKET_RE.match(name)
    assert m is not None, name
    return int(m.group(1)), int(m.group(2))


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp('syn') / 'raw'
    counts = render_market_tree(str(root), seed=3, **SMALL)
    return root, counts, read_tree(root)


def test_same_seed_byte_identical_and_independent_of_workers(tree, tmp_path):
    root, _, files = tree
    render_market_tree(str(tmp_path / 'again'), seed=3, workers=2, **SMALL)
    assert read_tree(tmp_path / 'again') == files


def test_different_seed_differs(tree, tmp_path):
    _, _, files = tree
    render_market_tree(str(tmp_path / 'other'), seed=4, **SMALL)
    other = read_tree(tmp_path / 'other')
    a = [b for d in SUBDIRS for b in files[d].values()]
    b = [b for d in SUBDIRS for b in other[d].values()]
    assert not set(a) & set(b)


def test_identity_and_camera_are_fixed_per_seed():
    assert make_identity(0, 7) == make_identity(0, 7)
    assert make_identity(0, 7) != make_identity(0, 8)
    assert make_identity(0, 7) != make_identity(1, 7)
    assert make_camera(0, 2) == make_camera(0, 2) != make_camera(0, 3)


def test_layout_names_and_counts(tree):
    _, counts, files = tree
    for d in SUBDIRS:
        for n in files[d]:
            parse(n)
    train = defaultdict(set)  # pid -> cams
    for n in files['bounding_box_train']:
        pid, cam = parse(n)
        train[pid].add(cam)
    assert len(train) == counts['num_train_ids'] == 5
    assert 0 not in train and -1 not in train
    # ims_per_id_cam images per (id, camera seeing it)
    assert counts['num_train_images'] == len(files['bounding_box_train']) == \
        2 * sum(len(c) for c in train.values())
    gallery = [parse(n) for n in files['bounding_box_test']]
    pids = {p for p, _ in gallery} - {0, -1}
    assert len(pids) == counts['num_test_ids'] == 6
    assert not pids & set(train)
    assert sum(p == 0 for p, _ in gallery) == counts['num_distractors'] > 0
    assert sum(p == -1 for p, _ in gallery) == counts['num_junk'] > 0
    assert len(gallery) == counts['num_gallery_images']
    assert len(files['query']) == counts['num_query_images']
    assert len(files['gt_bbox']) == counts['num_gt_bbox_images']
    for pid, cams in train.items():
        assert 2 <= len(cams) <= 4 and cams <= {1, 2, 3, 4}


def test_queries_one_per_id_camera_with_cross_camera_match(tree):
    _, _, files = tree
    queries = [parse(n) for n in files['query']]
    assert len(queries) == len(set(queries))
    gallery = defaultdict(list)
    for n in files['bounding_box_test']:
        pid, cam = parse(n)
        gallery[pid].append(cam)
    test_ids = set(gallery) - {0, -1}
    for pid in test_ids:
        # one query per camera that sees the id; 2 gallery images there
        q_cams = sorted(c for p, c in queries if p == pid)
        assert q_cams == sorted(set(gallery[pid]))
        assert all(gallery[pid].count(c) == 2 for c in q_cams)
    for pid, cam in queries:
        assert pid in test_ids
        assert any(c != cam for c in gallery[pid])
    # gt_bbox: the query itself plus 2 more boxes, for exactly the query (id, camera) pairs
    mq = defaultdict(int)
    for n in files['gt_bbox']:
        mq[parse(n)] += 1
    assert set(mq) == set(queries) and set(mq.values()) == {3}
    for n, b in files['query'].items():
        assert files['gt_bbox'][n] == b
    all_names = [n for d in ('bounding_box_train', 'bounding_box_test', 'gt_bbox') for n in files[d]]
    assert len(all_names) == len(set(all_names))


def test_image_size_and_content(tree):
    root, _, files = tree
    for d in SUBDIRS:
        for n in list(files[d])[:20]:
            with Image.open(root / d / n) as im:
                assert im.format == 'JPEG' and im.mode == 'RGB' and im.size == (24, 48)
                assert np.asarray(im).std() > 5  # not a blank image


def test_identity_cue_is_consistent_across_cameras(tmp_path):
    """The torso colour of one person varies less across cameras than between people (a crude
    check that identity survives the camera nuisances)."""
    render_market_tree(str(tmp_path), num_train_ids=12, num_test_ids=1, ims_per_id_cam=3,
                       num_cams=3, min_cams=3, im_size=(64, 32), seed=5, num_distractors=0,
                       num_junk=0)
    feats = defaultdict(list)
    for n in sorted(os.listdir(tmp_path / 'bounding_box_train')):
        a = np.asarray(Image.open(tmp_path / 'bounding_box_train' / n), np.float32)
        feats[parse(n)[0]].append(np.median(a[14:26, 10:22].reshape(-1, 3), axis=0))
    means = {p: np.mean(f, 0) for p, f in feats.items()}
    within = np.mean([np.linalg.norm(f - means[p]) for p, fs in feats.items() for f in fs])
    m = np.stack(list(means.values()))
    between = np.mean([np.linalg.norm(a - b) for i, a in enumerate(m) for b in m[i + 1:]])
    assert between > 1.5 * within


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='num_cams'):
        render_market_tree(str(tmp_path / 'a'), 2, 2, 1, num_cams=1)
    with pytest.raises(ValueError, match='min_cams'):
        render_market_tree(str(tmp_path / 'a'), 2, 2, 1, num_cams=3, min_cams=4)
    render_market_tree(str(tmp_path / 'b'), 2, 2, 1, num_cams=2, im_size=(32, 16))
    with pytest.raises(FileExistsError, match='overwrite'):
        render_market_tree(str(tmp_path / 'b'), 2, 2, 1, num_cams=2, im_size=(32, 16))
    render_market_tree(str(tmp_path / 'b'), 3, 2, 1, num_cams=2, im_size=(32, 16), overwrite=True)
    assert len({parse(n)[0] for n in os.listdir(tmp_path / 'b' / 'bounding_box_train')}) == 3



def test_synthetic_prepare_end_to_end(tmp_path, capsys):
    prep = load_script('data_set', 'synthetic_prepare')
    argv = ['--save_dir', str(tmp_path / 'syn'), '--num_train_ids', '8', '--num_test_ids', '5',
            '--ims_per_id_cam', '2', '--num_cams', '3', '--im_size', '32', '16', '--seed', '1']
    prep.main(argv)
    assert 'trainval' in capsys.readouterr().out
    path = tmp_path / 'syn' / 'partitions.pkl'
    part = read_partitions(str(path))
    validate_partitions(part, source=str(path))
    raw = read_tree(tmp_path / 'syn' / 'raw')
    assert len(part['trainval_im_names']) == len(raw['bounding_box_train'])
    assert sorted(part['trainval_ids2labels']) == sorted({parse(n)[0] for n in raw['bounding_box_train']})
    val_ids = {parse_im_name(n)[0] for n in part['val_im_names']}
    train_ids = {parse_im_name(n)[0] for n in part['train_im_names']}
    assert len(val_ids) == 2 and not val_ids & train_ids  # default min(100, 8 // 4)
    marks = np.asarray(part['test_marks'])
    ids = np.asarray([parse_im_name(n)[0] for n in part['test_im_names']])
    assert (marks == 0).sum() == len(raw['query'])
    assert (marks == 2).sum() == len(raw['gt_bbox'])
    assert (ids[marks == 1] == 0).sum() > 0 and -1 not in ids  # distractors kept, junk dropped
    for n in part['test_im_names'][:5]:
        with Image.open(tmp_path / 'syn' / 'images' / n) as im:
            assert im.size == (16, 32)
    with pytest.raises(FileExistsError, match='--overwrite'):
        prep.main(argv)
    prep.main(argv + ['--overwrite', '--num_test_ids', '4'])
    part = read_partitions(str(path))
    assert len({parse_im_name(n)[0] for n in part['test_im_names']} - {0}) == 4


def grid_iou(dx, dy, k, n=1200):
    """Brute force: IoU of the unit box [0, 1]^2 with the box centred at (0.5 + dx, 0.5 + dy), sides
    k, counted on an n x n grid of cell centres covering both boxes."""
    lo = min(0., 0.5 + min(dx, dy) - k / 2.)
    hi = max(1., 0.5 + max(dx, dy) + k / 2.)
    c = lo + (np.arange(n) + 0.5) * (hi - lo) / n
    x, y = c[None, :], c[:, None]
    a = (x >= 0) & (x <= 1) & (y >= 0) & (y <= 1)
    b = (np.abs(x - 0.5 - dx) <= k / 2.) & (np.abs(y - 0.5 - dy) <= k / 2.)
    return (a & b).sum() / (a | b).sum()


def test_box_iou_against_grid():
    rng = np.random.default_rng(0)
    cases = [(0., 0., 1.), (1. / 3., 0., 1.), (0., 0., 2. ** 0.5), (0.2, -0.1, 0.8), (1.5, 0., 1.),
             (0., 0., 0.5), (-0.4, 0.4, 1.3)]
    cases += [tuple(rng.uniform([-1, -1, 0.4], [1, 1, 2])) for _ in range(20)]
    for dx, dy, k in cases:
        assert abs(box_iou(dx, dy, k) - grid_iou(dx, dy, k)) < 0.01, (dx, dy, k)
    # The bounds of DETECTOR's poor detections sit on Market's IoU = 0.5 line.
    assert box_iou(DETECTOR['poor_span'], 0., 1.) == pytest.approx(0.5)
    assert box_iou(0., 0., DETECTOR['poor_scale']) == pytest.approx(0.5)
    assert box_iou(0., 0., 1.) == 1. and box_iou(2., 0., 1.) == 0.


def test_sample_box_follows_market_iou_rule():
    cams = [make_camera(0, c) for c in range(1, 7)]
    rng = np.random.default_rng(1)
    boxes = {kind: [sample_box(rng, cams[i % 6], kind) for i in range(600)]
             for kind in ('hand', 'detected', 'junk', 'distractor')}
    iou = {kind: np.array([box_iou(*b) for b in bs]) for kind, bs in boxes.items()}
    assert (iou['detected'] > 0.5).all()
    assert ((iou['junk'] >= 0.2) & (iou['junk'] <= 0.5)).all()
    assert ((iou['distractor'] > 0) & (iou['distractor'] < 0.2)).all()
    assert iou['hand'].min() > 0.75 and np.median(iou['hand']) > 0.93
    dy_hand = np.abs([b[1] for b in boxes['hand']])
    dy_det = np.abs([b[1] for b in boxes['detected']])
    # Detections are misaligned and often start below the head or end above the feet (the hand
    # box's margins are at most 6%), hand-drawn boxes are not.
    assert np.median(dy_det) > 3 * np.median(dy_hand)
    for kind, lo, hi in (('detected', 0.1, 0.5), ('hand', 0., 0.01)):
        b = np.array(boxes[kind])
        top, bottom = 0.5 + b[:, 1] - b[:, 2] / 2., 0.5 + b[:, 1] + b[:, 2] / 2.
        assert lo <= np.mean(top > 0.06) <= hi and lo <= np.mean(bottom < 0.94) <= hi, kind
    k_det = np.array([b[2] for b in boxes['detected']])
    assert k_det.min() < 0.85 and k_det.max() > 1.15


def _person_rows(img, background):
    """Rows of img [h, w, 3] that differ from the background render in some pixel."""
    diff = np.abs(np.asarray(img, np.int16) - np.asarray(background, np.int16)).max(axis=(1, 2))
    return np.nonzero(diff > 40)[0]


def test_render_image_places_the_person_by_its_box(monkeypatch):
    """With photometric effects, flips and occluders fixed, the person spans the rows the box
    predicts: a box moved down by a quarter of the person cuts off the head."""
    import aligned_reid.synthetic as syn
    monkeypatch.setitem(syn.DETECTOR, 'occlusion_prob', 0.)
    cam = dict(make_camera(0, 1), blur_prob=0., noise=0.)
    ident = make_identity(0, 3)
    rows = {}
    for name, box in (('hand', (0., 0., 1.)), ('down', (0., 0.25, 1.)), ('zoom_out', (0., 0., 1.3))):
        monkeypatch.setattr(syn, 'sample_box', lambda rng, cam, kind, box=box: box)
        monkeypatch.setattr(syn, '_draw_person', lambda *a, **k: None)
        bg = render_image(ident, cam, np.random.default_rng(5), (128, 64))
        monkeypatch.undo()
        monkeypatch.setitem(syn.DETECTOR, 'occlusion_prob', 0.)
        monkeypatch.setattr(syn, 'sample_box', lambda rng, cam, kind, box=box: box)
        img = render_image(ident, cam, np.random.default_rng(5), (128, 64))
        r = _person_rows(img, bg)
        rows[name] = (r.min(), r.max())
    # hand box: margins of 2-6% of 128 rows above the head and below the feet
    assert 1 <= rows['hand'][0] <= 9 and 118 <= rows['hand'][1] <= 127
    # moved down by 0.25 of the box: the body starts at the top row and ends ~32 rows higher
    assert rows['down'][0] == 0 and 86 <= rows['down'][1] <= 96
    # a box 1.3x larger: the person spans about 128 / 1.3 = 98 rows
    assert 88 <= rows['zoom_out'][1] - rows['zoom_out'][0] <= 100
