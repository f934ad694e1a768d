"""Tests of the DukeMTMC-reID preparation (data_set/duke_prepare.py) and of the official-count check."""
import pathlib
import warnings
import zipfile

import pytest
from PIL import Image

from aligned_reid import prepare
from aligned_reid.data import parse_im_name, read_partitions
from conftest import load_script




def build_duke_zip(path):
    """DukeMTMC-reID.zip: 5 train ids, 3 query ids, gallery with 2 extra (distractor) ids, 8 cameras."""
    buf = pathlib.Path(str(path) + '.jpg')
    Image.new('RGB', (4, 8), (90, 40, 10)).save(buf)
    data = buf.read_bytes()
    with zipfile.ZipFile(path, 'w') as zf:
        def add(sub, pid, cam, frame):
            zf.writestr(f'DukeMTMC-reID/{sub}/{pid:04d}_c{cam}_f{frame:07d}.jpg', data)
        for pid in (1, 5, 8, 9, 12):
            for cam in (pid % 8 + 1, (pid + 3) % 8 + 1):
                for f in range(2):
                    add('bounding_box_train', pid, cam, 46182 + 1000 * f + pid)
        for pid in (3, 6, 7):
            add('query', pid, 2, 500 + pid)
            add('query', pid, 7, 600 + pid)
            for cam in (2, 5, 7, 8):
                add('bounding_box_test', pid, cam, 700 + pid)
        for pid in (4, 10):  # gallery-only identities (Duke's distractor ids)
            add('bounding_box_test', pid, 1, 800 + pid)
        zf.writestr('DukeMTMC-reID/LICENSE_DukeMTMC-reID.txt', 'license')
        zf.writestr('DukeMTMC-reID/CITATION_DukeMTMC-reID.txt', 'cite')


def test_duke_zip(tmp_path):
    build_duke_zip(tmp_path / 'DukeMTMC-reID.zip')
    script = load_script('data_set', 'duke_prepare')
    with pytest.warns(UserWarning, match="split 'query'"):
        script.main(['--zip_file', str(tmp_path / 'DukeMTMC-reID.zip'), '--save_dir', str(tmp_path / 'duke'),
                     '--num_val_ids', '2'])
    part = read_partitions(str(tmp_path / 'duke' / 'partitions.pkl'))
    assert part['dataset'] == 'duke'
    assert part['trainval_ids2labels'] == {1: 0, 5: 1, 8: 2, 9: 3, 12: 4}
    assert len(part['trainval_im_names']) == 20
    assert [parse_im_name(n) for n in part['trainval_im_names'][:4]] == [(1, 2), (1, 2), (1, 5), (1, 5)]
    assert part['trainval_im_names'][:2] == ['00000001_0002_00000000.jpg', '00000001_0002_00000001.jpg']
    assert part['test_marks'] == [0] * 6 + [1] * 14
    q = [parse_im_name(n) for n, m in zip(part['test_im_names'], part['test_marks']) if m == 0]
    assert q == [(3, 2), (3, 7), (6, 2), (6, 7), (7, 2), (7, 7)]
    g = [parse_im_name(n) for n, m in zip(part['test_im_names'], part['test_marks']) if m == 1]
    assert sorted({pid for pid, _ in g}) == [3, 4, 6, 7, 10]
    assert {cam for _, cam in q + g} == {1, 2, 5, 7, 8}
    # query and gallery images of the same (id, camera) get distinct running indices
    assert len(set(part['test_im_names'])) == len(part['test_im_names'])
    assert sorted(p.name for p in (tmp_path / 'duke' / 'images').iterdir()) == sorted(
        part['trainval_im_names'] + part['test_im_names'])


def test_official_count_check(tmp_path):
    build_duke_zip(tmp_path / 'd.zip')
    exact = dict(trainval_ids=5, trainval_images=20, query_images=6, gallery_images=14, test_ids=5,
                 cameras=7)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        prepare.prepare_market_layout(tmp_path / 'd.zip', tmp_path / 'a', dataset='duke', num_val_ids=1,
                                      expected=exact)
    off = dict(exact, gallery_images=15, trainval_ids=4)
    with pytest.warns(UserWarning) as rec:
        prepare.prepare_market_layout(tmp_path / 'd.zip', tmp_path / 'b', dataset='duke', num_val_ids=1,
                                      expected=off)
    msg = str(rec[0].message)
    assert "split 'gallery': 14 images, official 15" in msg and "split 'trainval': 5 ids, official 4" in msg
    assert 'query' not in msg


def test_duke_missing_query_in_zip(tmp_path):
    with zipfile.ZipFile(tmp_path / 'd.zip', 'w') as zf:
        zf.writestr('DukeMTMC-reID/bounding_box_train/0001_c1_f0000001.jpg', b'x')
        zf.writestr('DukeMTMC-reID/bounding_box_test/0001_c2_f0000001.jpg', b'x')
    with pytest.raises(ValueError, match='DukeMTMC-reID/query'):
        prepare.prepare_market_layout(tmp_path / 'd.zip', tmp_path / 'out', dataset='duke')
    assert not (tmp_path / 'out').exists()
