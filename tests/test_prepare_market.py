"""Tests of the Market-1501 layout preparation (aligned_reid.prepare, data_set/market1501_prepare.py)
on hand-built trees with the real naming quirks."""
import hashlib
import os
import pickle
import subprocess
import sys
import zipfile
from collections import defaultdict

import pytest
from PIL import Image

from aligned_reid import prepare
from aligned_reid.data import parse_im_name, read_partitions
from conftest import REPO, build_market_tree, load_script, save_image, tree_digest


def expected_from_raw(files):
    """Reference partitions content computed from the raw names, independently of prepare.py."""
    def pid_cam(name):
        base = name.split('/')[1]
        pid = int(base.split('_')[0])
        return pid, int(base.split('_')[1][1])
    by_sub = defaultdict(list)
    for rel in sorted(files, key=lambda r: (r.split('/')[0], r.split('/')[1])):
        by_sub[rel.split('/')[0]].append(rel)
    queries = {pid_cam(r) for r in by_sub['query']}
    # k counts per (id, camera) over train, gallery, query, gt_bbox (the older reproduction's order,
    # format version 2); the test split lists query, gallery, multi-query.
    count = defaultdict(int)
    named = {}
    for sub in ('bounding_box_train', 'bounding_box_test', 'query', 'gt_bbox'):
        for rel in by_sub[sub]:
            pid, cam = pid_cam(rel)
            if pid == -1 or (sub == 'gt_bbox' and (pid, cam) not in queries):
                continue
            named[rel] = '%08d_%04d_%08d.jpg' % (pid, cam, count[pid, cam])
            count[pid, cam] += 1
    ref = {'trainval': [], 'test': []}
    for sub, split, mark in (('bounding_box_train', 'trainval', None), ('query', 'test', 0),
                             ('bounding_box_test', 'test', 1), ('gt_bbox', 'test', 2)):
        ref[split] += [(named[rel], mark, files[rel]) for rel in by_sub[sub] if rel in named]
    return ref


def image_value(path):
    return Image.open(path).convert('RGB').getpixel((1, 1))


def test_market_tree_with_quirks(tmp_path):
    files = build_market_tree(tmp_path / 'raw')
    before = tree_digest(tmp_path / 'raw')
    part = prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'out', num_val_ids=2, seed=3)
    assert tree_digest(tmp_path / 'raw') == before
    assert read_partitions(str(tmp_path / 'out' / 'partitions.pkl')) == part
    ref = expected_from_raw(files)

    assert part['trainval_im_names'] == [n for n, _, _ in ref['trainval']]
    assert part['trainval_ids2labels'] == {2: 0, 7: 1, 11: 2, 12: 3, 30: 4, 31: 5}
    assert part['test_im_names'] == [n for n, _, _ in ref['test']]
    assert part['test_marks'] == [m for _, m, _ in ref['test']]
    test_ids = [parse_im_name(n)[0] for n in part['test_im_names']]
    assert test_ids.count(0) == 3 and all(m == 1 for i, m in zip(test_ids, part['test_marks']) if i == 0)
    assert part['test_marks'].count(0) == 11 and part['test_marks'].count(2) == 11
    assert len(part['test_im_names']) == 11 + 22 + 3 + 11  # query, gallery, distractors, multi-query

    # every prepared image is its raw source (junk, Thumbs.db and hidden files never copied)
    images = tmp_path / 'out' / 'images'
    assert sorted(os.listdir(images)) == sorted(n for s in ref.values() for n, _, _ in s)
    for name, _, value in ref['trainval'] + ref['test']:
        got = image_value(images / name)
        assert abs(got[0] - value % 256) <= 3 and abs(got[1] - value // 256) <= 3

    # validation: 2 ids held out, disjoint from train, labels sorted and contiguous
    val_ids = {parse_im_name(n)[0] for n in part['val_im_names']}
    train_ids = {parse_im_name(n)[0] for n in part['train_im_names']}
    assert len(val_ids) == 2 and not val_ids & train_ids and val_ids | train_ids == set(part['trainval_ids2labels'])
    assert part['train_ids2labels'] == {pid: i for i, pid in enumerate(sorted(train_ids))}
    assert sorted(part['train_im_names'] + part['val_im_names']) == sorted(part['trainval_im_names'])
    for pid in val_ids:
        marks = [(parse_im_name(n)[1], m) for n, m in zip(part['val_im_names'], part['val_marks'])
                 if parse_im_name(n)[0] == pid]
        for cam, m in marks:
            if m == 0:  # every val query has a gallery match in another camera
                assert any(c != cam and mm == 1 for c, mm in marks)
        assert sum(m == 0 for _, m in marks) >= 1


def test_zip_input_equals_folder_input(tmp_path):
    build_market_tree(tmp_path / 'raw')
    zpath = tmp_path / 'Market-1501-v15.09.15.zip'
    with zipfile.ZipFile(zpath, 'w') as zf:
        for p in sorted((tmp_path / 'raw').rglob('*')):
            zf.write(p, p.relative_to(tmp_path / 'raw'))
        zf.writestr('__MACOSX/Market-1501-v15.09.15/bounding_box_train/._0002_c1s1_000002_01.jpg', b'x')
    zip_digest = hashlib.sha1(zpath.read_bytes()).hexdigest()
    a = prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'a', num_val_ids=2, verbose=False)
    b = prepare.prepare_market_layout(zpath, tmp_path / 'b', num_val_ids=2, verbose=False)
    assert a == b
    assert hashlib.sha1(zpath.read_bytes()).hexdigest() == zip_digest
    for name in a['trainval_im_names'] + a['test_im_names']:
        assert (tmp_path / 'a' / 'images' / name).read_bytes() == (tmp_path / 'b' / 'images' / name).read_bytes()


def test_deterministic_and_seeded(tmp_path):
    build_market_tree(tmp_path / 'raw')
    runs = [prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / f'o{i}', num_val_ids=2, seed=s,
                                          verbose=False) for i, s in enumerate((1, 1, 5))]
    assert runs[0] == runs[1]
    val = [{parse_im_name(n)[0] for n in r['val_im_names']} for r in runs]
    assert val[0] == val[1]
    seeds = [{parse_im_name(n)[0] for n in prepare.prepare_market_layout(
        tmp_path / 'raw', tmp_path / 'x', num_val_ids=2, seed=s, overwrite=True, verbose=False)['val_im_names']}
        for s in range(6)]
    assert len({frozenset(v) for v in seeds}) > 1  # the seed matters


def test_no_gt_bbox_and_copy_mode(tmp_path):
    build_market_tree(tmp_path / 'raw')
    part = prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'out', num_val_ids=1,
                                         use_gt_bbox=False, link=False, verbose=False)
    assert 2 not in part['test_marks']
    src = next((tmp_path / 'raw').rglob('0002_c1s1_*_01.jpg'))
    assert os.stat(src).st_nlink == 1  # copies, no links to the raw files


def test_hard_links_share_the_raw_file(tmp_path):
    build_market_tree(tmp_path / 'raw')
    part = prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'out', num_val_ids=1, verbose=False)
    first = tmp_path / 'out' / 'images' / part['trainval_im_names'][0]
    assert os.stat(first).st_nlink == 2


def test_val_marks_rule():
    assert prepare.val_marks_for_identity([1, 1, 2, 2, 2]) == [0, 1, 0, 1, 1]
    assert prepare.val_marks_for_identity([1, 2]) == [1, 0]
    # a camera's query that would only have same-camera gallery images left becomes gallery
    assert prepare.val_marks_for_identity([3, 1, 1]) == [0, 1, 1]
    assert prepare.val_marks_for_identity([1, 2, 2]) == [0, 1, 1]
    assert prepare.val_marks_for_identity([1, 1, 2]) == [1, 1, 0]
    for cams in ([1, 2], [1, 1, 2], [2, 1, 1, 1], [1, 2, 3], [5, 5, 5, 6]):
        marks = prepare.val_marks_for_identity(cams)
        assert 0 in marks and 1 in marks
        for c, m in zip(cams, marks):
            if m == 0:
                assert any(cc != c and mm == 1 for cc, mm in zip(cams, marks))


def test_overwrite_refused_then_allowed(tmp_path):
    build_market_tree(tmp_path / 'raw')
    prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'out', num_val_ids=1, verbose=False)
    (tmp_path / 'out' / 'images' / 'stale.jpg').write_bytes(b'old')
    with pytest.raises(FileExistsError, match='overwrite'):
        prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'out', num_val_ids=1, verbose=False)
    assert (tmp_path / 'out' / 'images' / 'stale.jpg').exists()
    part = prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'out', num_val_ids=2,
                                         overwrite=True, verbose=False)
    assert not (tmp_path / 'out' / 'images' / 'stale.jpg').exists()
    assert len({parse_im_name(n)[0] for n in read_partitions(str(tmp_path / 'out' / 'partitions.pkl'))
                ['val_im_names']}) == 2 == len({parse_im_name(n)[0] for n in part['val_im_names']})


def test_save_dir_may_hold_the_raw_download(tmp_path):
    """The default layout: ~/Dataset/market1501/ holds the zip and receives images/ + partitions.pkl."""
    build_market_tree(tmp_path)
    prepare.prepare_market_layout(tmp_path, tmp_path, num_val_ids=1, verbose=False)
    prepare.prepare_market_layout(tmp_path, tmp_path, num_val_ids=1, overwrite=True, verbose=False)
    assert (tmp_path / 'Market-1501-v15.09.15' / 'query').is_dir()
    build_market_tree(tmp_path / 'other' / 'images')
    with pytest.raises(ValueError, match='inside the output folder'):
        prepare.prepare_market_layout(tmp_path / 'other' / 'images', tmp_path / 'other', overwrite=True,
                                      verbose=False)
    assert (tmp_path / 'other' / 'images' / 'Market-1501-v15.09.15' / 'query').is_dir()


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize('existing', [False, True])
def test_interrupted_run_leaves_no_partitions(tmp_path, monkeypatch, existing):
    """A failure while the new set is written leaves no partitions file, or, with --overwrite of an
    existing set, the old set exactly as it was (and nothing beside it); a plain rerun then works."""
    build_market_tree(tmp_path / 'raw')
    if existing:
        prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'out', num_val_ids=1, verbose=False)
        before = tree_digest(tmp_path / 'out')
    calls = []
    original = prepare._Writer.write

    def failing_write(self, src, dst):
        calls.append(dst)
        if len(calls) == 10:
            raise Boom('disk full')
        return original(self, src, dst)

    monkeypatch.setattr(prepare._Writer, 'write', failing_write)
    with pytest.raises(Boom):
        prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'out', num_val_ids=1,
                                      overwrite=existing, verbose=False)
    if existing:
        assert tree_digest(tmp_path / 'out') == before
        assert sorted(os.listdir(tmp_path / 'out')) == ['images', 'partitions.pkl']
    else:
        assert not (tmp_path / 'out' / 'partitions.pkl').exists()
        assert not (tmp_path / 'out' / 'images').exists()
    monkeypatch.setattr(prepare._Writer, 'write', original)
    prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'out', num_val_ids=1, verbose=False,
                                  overwrite=existing)
    assert (tmp_path / 'out' / 'partitions.pkl').exists()


def test_failure_in_partitions_write_leaves_none(tmp_path, monkeypatch):
    build_market_tree(tmp_path / 'raw')

    def bad_dump(obj, f, protocol=None):
        f.write(b'\x80\x04partial')
        raise Boom('killed')

    monkeypatch.setattr(pickle, 'dump', bad_dump)
    with pytest.raises(Boom):
        prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'out', num_val_ids=1, verbose=False)
    assert not (tmp_path / 'out' / 'partitions.pkl').exists()


def test_bad_input_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere'):
        prepare.prepare_market_layout(tmp_path / 'nowhere', tmp_path / 'out')
    build_market_tree(tmp_path / 'raw')
    top = tmp_path / 'raw' / 'Market-1501-v15.09.15'
    for p in (top / 'query').iterdir():
        p.unlink()
    (top / 'query').rmdir()
    with pytest.raises(ValueError, match=r'missing subfolder .*query/'):
        prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'out')
    (top / 'query').mkdir()
    (top / 'query' / 'Thumbs.db').write_bytes(b'x')
    with pytest.raises(ValueError, match='query/ holds no usable images'):
        prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'out')
    save_image(top / 'query' / '0040_c1s2_000040_00.jpg', 1)
    save_image(top / 'bounding_box_train' / 'person_12.jpg', 1)
    with pytest.raises(ValueError, match='person_12.jpg'):
        prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'out')
    (top / 'bounding_box_train' / 'person_12.jpg').unlink()
    with pytest.raises(ValueError, match='num_val_ids=100'):
        prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()  # nothing written before the input is known good
    save_image(top / 'query' / '0000_c1s2_000040_00.jpg', 1)
    with pytest.raises(ValueError, match='distractor'):
        prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'out')
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(ValueError, match='bounding_box_train'):
        prepare.prepare_market_layout(empty, tmp_path / 'out')
    bad_zip = tmp_path / 'bad.zip'
    with zipfile.ZipFile(bad_zip, 'w') as zf:
        zf.writestr('Market/query/0001_c1s1_000001_00.jpg', b'x')
    with pytest.raises(ValueError, match='bounding_box_train'):
        prepare.prepare_market_layout(bad_zip, tmp_path / 'out')


def test_cli_main_and_flags(tmp_path, capsys):
    build_market_tree(tmp_path / 'raw')
    script = load_script('data_set', 'market1501_prepare')
    with pytest.warns(UserWarning, match="split 'trainval'"):
        script.main(['--raw_dir', str(tmp_path / 'raw'), '--save_dir', str(tmp_path / 'out'),
                     '--num_val_ids', '2'])
    out = capsys.readouterr().out
    assert 'trainval' in out and 'multi-query' in out and 'junk' in out
    with pytest.raises(FileExistsError):
        script.main(['--raw_dir', str(tmp_path / 'raw'), '--save_dir', str(tmp_path / 'out')])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        script.main(['--raw_dir', 'a', '--zip_file', 'b'])
    err = capsys.readouterr().err
    assert '--zip_file' in err and '--raw_dir' in err and 'not allowed' in err


def test_cli_default_paths_from_data_set_folder(tmp_path):
    """`cd data_set && python market1501_prepare.py` with the zip in ~/Dataset/market1501/."""
    build_market_tree(tmp_path / 'raw')
    home = tmp_path / 'home'
    dataset = home / 'Dataset' / 'market1501'
    dataset.mkdir(parents=True)
    with zipfile.ZipFile(dataset / 'Market-1501-v15.09.15.zip', 'w') as zf:
        for p in sorted((tmp_path / 'raw').rglob('*')):
            zf.write(p, p.relative_to(tmp_path / 'raw'))
    env = dict(os.environ, HOME=str(home), PYTHONWARNINGS='ignore')
    cmd = [sys.executable, 'market1501_prepare.py', '--num_val_ids', '2']
    res = subprocess.run(cmd, cwd=REPO / 'data_set', env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    part = read_partitions(str(dataset / 'partitions.pkl'))
    assert len(part['trainval_ids2labels']) == 6
    res = subprocess.run(cmd, cwd=REPO / 'data_set', env=env, capture_output=True, text=True)
    assert res.returncode != 0 and '--overwrite' in res.stderr and 'Traceback' not in res.stderr


def test_oddities(tmp_path):
    """Upper-case extensions are images; sub-folders, hidden files and zip members outside the split
    folders are ignored; a name with a newline is refused; nothing is written outside save_dir."""
    files = build_market_tree(tmp_path / 'raw')
    top = tmp_path / 'raw' / 'Market-1501-v15.09.15'
    save_image(top / 'bounding_box_train' / '0031_c2s3_999999_01.JPG', 1)
    (top / 'bounding_box_train' / 'sub').mkdir()
    save_image(top / 'bounding_box_train' / 'sub' / '0099_c1s1_000001_01.jpg', 1)
    part = prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'out', num_val_ids=1, verbose=False)
    n_train = sum(r.startswith('bounding_box_train/') for r in files)
    assert len(part['trainval_im_names']) == n_train + 1
    assert 99 not in part['trainval_ids2labels']

    zpath = tmp_path / 'odd.zip'
    with zipfile.ZipFile(zpath, 'w') as zf:
        for p in sorted((tmp_path / 'raw').rglob('*')):
            if p.is_file() and 'sub' not in p.parts:
                zf.write(p, p.relative_to(tmp_path / 'raw'))
        zf.writestr('Market-1501-v15.09.15/bounding_box_train/../../../escape_c1s1_0.jpg', b'x')
        zf.writestr('/abs/0002_c1s1_000001_01.jpg', b'x')
    before = sorted(p.name for p in tmp_path.iterdir())
    part_zip = prepare.prepare_market_layout(zpath, tmp_path / 'z', num_val_ids=1, verbose=False)
    assert part_zip == part
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ['z'])
    assert sorted(p.name for p in (tmp_path / 'z').iterdir()) == ['images', 'partitions.pkl']

    save_image(top / 'query' / '0040_c1s2_000040_00.jpg\n.jpg', 1)
    with pytest.raises(ValueError, match='cannot parse'):
        prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'o2', num_val_ids=1)
