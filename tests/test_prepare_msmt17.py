"""Tests of data_set/msmt17_prepare.py on small MSMT17 V1 (folder) and V2 (zip) trees with list files."""
import zipfile

import pytest
from PIL import Image

from aligned_reid.data import parse_im_name, read_partitions
from conftest import load_script

# tiny inputs: the official-count warning is expected (asserted where it matters)
pytestmark = pytest.mark.filterwarnings('ignore:.*counts differ from the official ones')



msmt = load_script('data_set', 'msmt17_prepare')


def build_msmt(root, train_dir='train', test_dir='test'):
    """4 train labels (0-3; label 3 only in list_val), 3 test labels (0-2) over cameras 1-15.
    Returns {list name: [(relative path, label, camera)]}."""
    lists = {'list_train.txt': [], 'list_val.txt': [], 'list_query.txt': [], 'list_gallery.txt': []}
    for label in range(4):
        for j, cam in enumerate((label + 1, label + 9, 15)):
            rel = f'{label:04d}/{label:04d}_{j:03d}_{cam:02d}_0303morning_{100 + j:04d}_{j}.jpg'
            lists['list_val.txt' if label == 3 or j == 2 else 'list_train.txt'].append((rel, label, cam))
    for label in range(3):
        for j, cam in enumerate((2, 5, 5, 11)):
            rel = f'{label:04d}/{label:04d}_{j:03d}_{cam:02d}_0113noon_{200 + j:04d}_{j}.jpg'
            lists['list_query.txt' if j == 0 else 'list_gallery.txt'].append((rel, label, cam))
    for name, rows in lists.items():
        image_dir = root / (train_dir if name in ('list_train.txt', 'list_val.txt') else test_dir)
        for rel, label, cam in rows:
            (image_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new('RGB', (4, 8), (label, cam, 9)).save(image_dir / rel)
        (root / name).write_text(''.join(f'{rel} {label}\n' for rel, label, _ in rows))
    return lists


def check(part, lists):
    want = sorted((label + 1, cam) for n in ('list_train.txt', 'list_val.txt') for _, label, cam in lists[n])
    assert sorted(parse_im_name(n) for n in part['trainval_im_names']) == want
    assert part['trainval_ids2labels'] == {1: 0, 2: 1, 3: 2, 4: 3}
    q = [parse_im_name(n) for n, m in zip(part['test_im_names'], part['test_marks']) if m == 0]
    g = [parse_im_name(n) for n, m in zip(part['test_im_names'], part['test_marks']) if m == 1]
    assert q == [(label + 5, 2) for label in range(3)]  # test labels shifted past the 4 train labels
    assert sorted(g) == sorted((label + 5, cam) for label in range(3) for cam in (5, 5, 11))
    assert len(set(part['test_im_names'] + part['trainval_im_names'])) == 12 + 12


def test_v1_folder(tmp_path):
    lists = build_msmt(tmp_path / 'MSMT17_V1')
    with pytest.warns(UserWarning, match="split 'test': 3 ids, official 3060.*cameras: 10, official 15"):
        part = msmt.main(['--raw_dir', str(tmp_path), '--save_dir', str(tmp_path / 'out'), '--num_val_ids', '1'])
    assert part == read_partitions(str(tmp_path / 'out' / 'partitions.pkl'))
    check(part, lists)
    im = Image.open(tmp_path / 'out' / 'images' / part['test_im_names'][0]).convert('RGB')
    assert abs(im.getpixel((1, 1))[1] - 2) <= 3  # the query of test label 0 was seen by camera 2


def test_v2_zip(tmp_path):
    lists = build_msmt(tmp_path / 'MSMT17_V2', 'mask_train_v2', 'mask_test_v2')
    zpath = tmp_path / 'MSMT17_V2.zip'
    with zipfile.ZipFile(zpath, 'w') as zf:
        for p in sorted((tmp_path / 'MSMT17_V2').rglob('*')):
            zf.write(p, p.relative_to(tmp_path))
    part = msmt.prepare_msmt17(zpath, tmp_path / 'out', num_val_ids=1)
    check(part, lists)


def test_bad_lists(tmp_path):
    root = tmp_path / 'MSMT17_V1'
    build_msmt(root)
    query = (root / 'list_query.txt').read_text()
    (root / 'list_query.txt').write_text(query + 'no-label-here.jpg\n')
    with pytest.raises(ValueError, match=r"list_query.txt line 4: 'no-label-here.jpg'"):
        msmt.prepare_msmt17(root, tmp_path / 'out', num_val_ids=1)
    (root / 'list_query.txt').write_text(query + '0000/badname.jpg 0\n')
    with pytest.raises(ValueError, match='list_query.txt line 4.*badname'):
        msmt.prepare_msmt17(root, tmp_path / 'out', num_val_ids=1)
    (root / 'list_query.txt').write_text(query + '\n0000/0000_009_03_0113noon_0001_0.jpg 0\n')
    with pytest.raises(FileNotFoundError, match='list_query.txt line 5: image listed but missing'):
        msmt.prepare_msmt17(root, tmp_path / 'out', num_val_ids=1)
    (root / 'list_query.txt').write_text(query)
    (root / 'list_gallery.txt').unlink()
    with pytest.raises(ValueError, match='missing list file .*list_gallery.txt'):
        msmt.prepare_msmt17(root, tmp_path / 'out', num_val_ids=1)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='list_train.txt'):
        msmt.prepare_msmt17(tmp_path / 'empty', tmp_path / 'o2')
    assert not (tmp_path / 'out' / 'partitions.pkl').exists()


def test_list_paths_stay_inside(tmp_path):
    root = tmp_path / 'MSMT17_V1'
    build_msmt(root)
    outside = tmp_path / '0000_000_01_0303morning_0015_0.jpg'
    Image.new('RGB', (4, 8)).save(outside)
    query = (root / 'list_query.txt').read_text()
    for bad in ('../../0000_000_01_0303morning_0015_0.jpg 0', f'{outside} 0'):
        (root / 'list_query.txt').write_text(query + bad + '\n')
        with pytest.raises(ValueError, match='list_query.txt line 4: .*inside the image folder'):
            msmt.prepare_msmt17(root, tmp_path / 'out', num_val_ids=1)
