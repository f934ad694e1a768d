"""Tests of data_set/combine_all.py: trainval sets of prepared datasets combined with disjoint ids and cameras."""

import os

import pytest
from PIL import Image

from aligned_reid import prepare
from aligned_reid.data import parse_im_name, read_partitions
from conftest import load_script

# tiny inputs: the official-count warning is expected (asserted where it matters)
pytestmark = pytest.mark.filterwarnings('ignore:.*counts differ from the official ones')



combine_all = load_script('data_set', 'combine_all')


def make_prepared(root, dataset, pids, cams, tag):
    """A prepared dataset whose trainval images have colour (tag, pid, cam)."""
    raw = root / f'{dataset}_raw'
    raw.mkdir()
    items = []
    for pid in pids:
        for cam in cams:
            path = raw / f'{pid}_{cam}.png'
            Image.new('RGB', (4, 8), (tag, pid, cam)).save(path)
            items.append(prepare.Item(str(path), pid, cam, 'trainval'))
    items.append(prepare.Item(str(path), 999, cams[0], 'query'))
    items.append(prepare.Item(str(path), 999, cams[1], 'gallery'))
    prepare.write_prepared(items, root / dataset, dataset, num_val_ids=1, verbose=False)
    return root / dataset


def test_combine_three(tmp_path, capsys):
    a = make_prepared(tmp_path, 'market1501', (2, 7, 9), (1, 3), 10)
    b = make_prepared(tmp_path, 'cuhk03_detected', (5, 9), (4, 1), 60)
    c = make_prepared(tmp_path, 'duke', (1, 2, 3, 40), (8, 2), 120)
    with pytest.warns(UserWarning, match="'trainval': 9 ids, official 2220"):
        part, prov = combine_all.combine([str(a), str(b / 'partitions.pkl'), str(c)], tmp_path / 'all')
    out = capsys.readouterr().out
    assert 'ids 1-3 (3 ids, 6 images) <- market1501' in out and 'ids 4-5' in out and 'ids 6-9' in out
    assert part == read_partitions(str(tmp_path / 'all' / 'partitions.pkl'))
    assert set(part) == {'format_version', 'dataset', 'trainval_im_names', 'trainval_ids2labels'}
    assert part['dataset'] == 'market1501+cuhk03_detected+duke'
    assert part['trainval_ids2labels'] == {i: i - 1 for i in range(1, 10)}
    # reference: ids numbered in dataset order by sorted old id, cameras by sorted old camera
    ref = []
    for off_id, off_cam, tag, pids, cams in ((0, 0, 10, (2, 7, 9), (1, 3)), (3, 2, 60, (5, 9), (1, 4)),
                                             (5, 4, 120, (1, 2, 3, 40), (2, 8))):
        for i, pid in enumerate(pids):
            for j, cam in enumerate(cams):
                ref.append(((off_id + i + 1, off_cam + j + 1), (tag, pid, cam)))
    got = []
    for n in part['trainval_im_names']:
        im = Image.open(tmp_path / 'all' / 'images' / n).convert('RGB')
        got.append((parse_im_name(n), im.getpixel((1, 1))))
    assert sorted(got) == sorted(ref)
    assert [p[6] for p in prov] == [6, 4, 8]


def test_combine_bad_input(tmp_path):
    a = make_prepared(tmp_path, 'market1501', (2, 7, 9), (1, 3), 10)
    with pytest.raises(FileNotFoundError, match='nothere'):
        combine_all.main(['--datasets', str(a), str(tmp_path / 'nothere'), '--save_dir', str(tmp_path / 'o')])
    with pytest.raises(ValueError, match='given twice'):
        combine_all.main(['--datasets', str(a), str(a / 'partitions.pkl'), '--save_dir', str(tmp_path / 'o')])
    combine_all.main(['--datasets', str(a), '--save_dir', str(tmp_path / 'o')])
    with pytest.raises(FileExistsError):
        combine_all.main(['--datasets', str(a), '--save_dir', str(tmp_path / 'o')])
    b = make_prepared(tmp_path, 'duke', (1, 2), (1, 2), 10)
    (b / 'images' / read_partitions(str(b / 'partitions.pkl'))['trainval_im_names'][1]).unlink()
    before = read_partitions(str(tmp_path / 'o' / 'partitions.pkl'))
    with pytest.raises(FileNotFoundError, match='image listed but missing'):
        combine_all.main(['--datasets', str(a), str(b), '--save_dir', str(tmp_path / 'o'), '--overwrite'])
    # the failed --overwrite left the previous combined set whole
    assert read_partitions(str(tmp_path / 'o' / 'partitions.pkl')) == before
    assert sorted(os.listdir(tmp_path / 'o' / 'images')) == sorted(before['trainval_im_names'])
