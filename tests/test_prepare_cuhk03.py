"""Tests of data_set/cuhk03_prepare.py on small inputs in the real formats: an HDF5 file with MATLAB
v7.3 style object references (cuhk-03.mat), v5 protocol files (scipy), and the CUHK03-NP folders."""
import zipfile

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from aligned_reid.data import parse_im_name, read_partitions
from conftest import load_script

# tiny inputs: the official-count warning is expected (asserted where it matters)
pytestmark = pytest.mark.filterwarnings('ignore:.*counts differ from the official ones')
PERSONS = (4, 3, 2)  # persons per camera pair (the real file: 843, 440, 77, 58, 49)



cuhk03 = load_script('data_set', 'cuhk03_prepare')


def image_of(t, pair, person, slot):
    """H x W x 3 image whose flat colour encodes (type, pair, person, slot)."""
    im = np.zeros((8 + slot, 4, 3), np.uint8)
    im[..., 0] = 40 * pair + 10
    im[..., 1] = 20 * person + 5
    im[..., 2] = 15 * slot + 3 + 100 * (t == 'detected')
    return im


def empty_slots(t):
    return {(0, 1, 3), (1, 0, 7), (2, 1, 9)} | ({(0, 0, 0)} if t == 'detected' else set())


def write_mat(path, testsets=((0, 2), (1, 0)), skip=(), float_image=None):
    """cuhk-03.mat as MATLAB v7.3 writes it: cell arrays are datasets of object references into
    '#refs#', every array stored transposed (column-major)."""
    with h5py.File(path, 'w') as f:
        refs = f.create_group('#refs#')
        count = [0]

        def store(arr):
            count[0] += 1
            return refs.create_dataset(f'r{count[0]}', data=arr).ref

        for t in ('labeled', 'detected'):
            if t in skip:
                continue
            cells = []
            for pair, n in enumerate(PERSONS):
                cell = np.empty((n, 10), dtype=h5py.ref_dtype)
                for person in range(n):
                    for slot in range(10):
                        if (pair, person, slot) in empty_slots(t):
                            cell[person, slot] = store(np.zeros(2, np.uint64))
                        elif (t, pair, person, slot) == float_image:
                            cell[person, slot] = store(image_of(t, pair, person, slot).T.astype(np.float64))
                        else:
                            cell[person, slot] = store(image_of(t, pair, person, slot).T)
                cells.append(store(cell.T))
            f.create_dataset(t, data=np.array([cells], dtype=h5py.ref_dtype))  # [1, 5] like the real file
        if 'testsets' not in skip:
            sets = [store(np.array([[pair + 1, person + 1]], np.float64).T) for pair, person in testsets]
            f.create_dataset('testsets', data=np.array([sets], dtype=h5py.ref_dtype))


def protocol_name(pair, person, slot):
    return f'{pair + 1}_{person + 1:03d}_{slot // 5 + 1}_{slot + 1:02d}.png'


def write_protocol(path, t, drop_field=None):
    """cuhk03_new_protocol_config_<t>.mat: train = pair 0 persons 0-2; test = the other persons, in
    each camera of the pair one image listed as query and the rest as gallery."""
    names, labels, cams, train, query, gallery = [], [], [], [], [], []
    for pair, n in enumerate(PERSONS):
        for person in range(n):
            for slot in range(10):
                if (pair, person, slot) in empty_slots(t):
                    continue
                names.append(protocol_name(pair, person, slot))
                labels.append(100 * pair + person + 1)
                cams.append(slot // 5 + 1)
                i = len(names)  # 1-based
                if pair == 0 and person < 3:
                    train.append(i)
                elif slot in (1, 6):
                    query.append(i)
                else:
                    gallery.append(i)
    filelist = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        filelist[i, 0] = n
    fields = dict(filelist=filelist, labels=np.array(labels, np.float64)[:, None],
                  camId=np.array(cams, np.float64)[:, None], train_idx=np.array(train, np.float64)[:, None],
                  query_idx=np.array(query, np.float64)[:, None], gallery_idx=np.array(gallery, np.float64)[:, None])
    fields.pop(drop_field, None)
    savemat(path, fields)
    return names, train, query, gallery


def pid_of(pair, person):
    return sum(PERSONS[:pair]) + person + 1


def cam_of(pair, slot):
    return 2 * pair + slot // 5 + 1


def colour(path):
    return Image.open(path).convert('RGB').getpixel((1, 2))


def check_image(path, t, pair, person, slot):
    got, want = colour(path), image_of(t, pair, person, slot)[0, 0]
    assert all(abs(int(a) - int(b)) <= 4 for a, b in zip(got, want)), (path, got, want)


@pytest.fixture()
def release(tmp_path):
    raw = tmp_path / 'cuhk03_release'
    raw.mkdir()
    write_mat(raw / 'cuhk-03.mat')
    lists = {t: write_protocol(tmp_path / f'cuhk03_new_protocol_config_{t}.mat', t) for t in ('labeled', 'detected')}
    return raw, lists


def test_new_protocol_from_mat(tmp_path, release):
    raw, lists = release
    with pytest.warns(UserWarning, match="cuhk03_labeled counts .*split 'query': 6 ids, official 700"):
        res = cuhk03.main(['--raw_dir', str(raw), '--save_dir', str(tmp_path / 'out'), '--num_val_ids', '1'])
    assert set(res) == {'labeled', 'detected'}
    for t in ('labeled', 'detected'):
        part = read_partitions(str(tmp_path / 'out' / t / 'partitions.pkl'))
        assert part == res[t] and part['dataset'] == f'cuhk03_{t}'
        names, train, query, gallery = lists[t]
        # reference: the listed (pair, person, slot) triples, named by (pid, camera) in slot order
        def ref(idx):
            out = []
            for i in idx:
                pair, person, _, slot = (int(g) - 1 for g in names[i - 1][:-4].split('_'))
                out.append((pid_of(pair, person), cam_of(pair, slot), slot, pair, person))
            return sorted(out)
        tv = ref(train)
        assert [parse_im_name(n) for n in part['trainval_im_names']] == [r[:2] for r in tv]
        assert part['trainval_ids2labels'] == {1: 0, 2: 1, 3: 2}
        for n, (_, _, slot, pair, person) in zip(part['trainval_im_names'], tv):
            check_image(tmp_path / 'out' / t / 'images' / n, t, pair, person, slot)
        q, g = ref(query), ref(gallery)
        assert part['test_marks'] == [0] * len(q) + [1] * len(g)
        assert [parse_im_name(n) for n in part['test_im_names']] == [r[:2] for r in q + g]
        test = list(zip(part['test_im_names'], q + g))
        for n, (_, _, slot, pair, person) in test:
            check_image(tmp_path / 'out' / t / 'images' / n, t, pair, person, slot)
        # cameras are distinct per pair: pair 2 uses cameras 5 and 6
        assert {parse_im_name(n)[1] for n in part['test_im_names']} == {1, 2, 3, 4, 5, 6}
    # the empty detected slot (0, 0, 0) is skipped; the person's later slots are still used
    det = read_partitions(str(tmp_path / 'out' / 'detected' / 'partitions.pkl'))
    assert sum(parse_im_name(n) == (1, 1) for n in det['trainval_im_names']) == 4
    lab = read_partitions(str(tmp_path / 'out' / 'labeled' / 'partitions.pkl'))
    assert sum(parse_im_name(n) == (1, 1) for n in lab['trainval_im_names']) == 5


def test_classic_split_from_zip(tmp_path, release):
    raw, _ = release
    zpath = tmp_path / 'cuhk03_release.zip'
    with zipfile.ZipFile(zpath, 'w') as zf:
        zf.write(raw / 'cuhk-03.mat', 'cuhk03_release/cuhk-03.mat')
        zf.writestr('cuhk03_release/README.md', 'readme')
    out = tmp_path / 'out'
    res = cuhk03.main(['--zip_file', str(zpath), '--save_dir', str(out), '--split', 'classic',
                       '--split_id', '1', '--num_val_ids', '2', '--image_types', 'labeled'])
    part = res['labeled']
    assert not (out / 'detected').exists()
    assert sorted(p.name for p in out.iterdir()) == ['labeled']  # the extracted .mat is gone
    test_pid = pid_of(1, 0)
    assert {parse_im_name(n)[0] for n in part['test_im_names']} == {test_pid}
    assert len(part['trainval_ids2labels']) == sum(PERSONS) - 1
    assert test_pid not in part['trainval_ids2labels']
    # test marks: first image of each camera is a query, the rest gallery
    # person (1, 0) lacks slot 7: 5 + 4 images; the first of each camera is a query
    assert part['test_marks'] == [0, 0] + [1] * 7
    assert [parse_im_name(n)[1] for n in part['test_im_names']] == [3, 4] + [3] * 4 + [4] * 3
    images = out / 'labeled' / 'images'
    check_image(images / part['test_im_names'][0], 'labeled', 1, 0, 0)
    check_image(images / part['test_im_names'][1], 'labeled', 1, 0, 5)
    check_image(images / part['test_im_names'][-1], 'labeled', 1, 0, 9)
    n_images = sum(10 * n for n in PERSONS) - len(empty_slots('labeled'))
    assert len(part['trainval_im_names']) + len(part['test_im_names']) == n_images
    with pytest.raises(ValueError, match='split_id 5'):
        cuhk03.main(['--zip_file', str(zpath), '--save_dir', str(tmp_path / 'o2'), '--split', 'classic',
                     '--split_id', '5', '--num_val_ids', '1'])


def test_np_folder_layout(tmp_path):
    root = tmp_path / 'cuhk03-np'
    data = {}
    for t in ('labeled', 'detected'):
        for sub, pids in (('bounding_box_train', (1, 2, 3)), ('query', (5, 6)), ('bounding_box_test', (5, 6, 7))):
            (root / t / sub).mkdir(parents=True)
            for pid in pids:
                for cam in (1, 2):
                    for j in range(1 if sub == 'query' else 2):
                        name = f'{pid:04d}_c{cam}_{j + 1 + 5 * (sub == "bounding_box_test")}.png'
                        Image.new('RGB', (4, 8), (pid, cam, j)).save(root / t / sub / name)
                        data[t, sub, name] = (pid, cam)
    res = cuhk03.main(['--raw_dir', str(root), '--save_dir', str(tmp_path / 'out'), '--num_val_ids', '1'])
    for t in ('labeled', 'detected'):
        part = res[t]
        assert part['trainval_ids2labels'] == {1: 0, 2: 1, 3: 2} and len(part['trainval_im_names']) == 12
        assert part['test_marks'] == [0] * 4 + [1] * 12
        assert [parse_im_name(n) for n in part['test_im_names'][:4]] == [(5, 1), (5, 2), (6, 1), (6, 2)]
        assert (tmp_path / 'out' / t / 'partitions.pkl').exists()
    with pytest.raises(SystemExit):
        cuhk03.main(['--raw_dir', str(root), '--save_dir', str(tmp_path / 'o2'), '--split', 'classic'])


def test_bad_mat_and_protocol_files(tmp_path, release):
    raw, _ = release
    bad = tmp_path / 'bad'
    bad.mkdir()
    write_mat(bad / 'cuhk-03.mat', skip=('detected',))
    proto = ['--protocol_dir', str(tmp_path)]
    with pytest.raises(ValueError, match="no dataset 'detected'"):
        cuhk03.main(['--raw_dir', str(bad), '--save_dir', str(tmp_path / 'o1'), *proto, '--num_val_ids', '1'])
    nots = tmp_path / 'nots'
    nots.mkdir()
    write_mat(nots / 'cuhk-03.mat', skip=('testsets',))
    with pytest.raises(ValueError, match="'testsets'"):
        cuhk03.main(['--raw_dir', str(nots), '--save_dir', str(tmp_path / 'o2'), '--split', 'classic'])
    pdir = tmp_path / 'proto'
    pdir.mkdir()
    write_protocol(pdir / 'cuhk03_new_protocol_config_labeled.mat', 'labeled', drop_field='query_idx')
    with pytest.raises(ValueError, match="missing field 'query_idx'"):
        cuhk03.main(['--raw_dir', str(raw), '--save_dir', str(tmp_path / 'o3'), '--protocol_dir', str(pdir),
                     '--image_types', 'labeled'])
    with pytest.raises(FileNotFoundError, match='cuhk03_new_protocol_config_detected.mat'):
        cuhk03.main(['--raw_dir', str(raw), '--save_dir', str(tmp_path / 'o4'), '--protocol_dir', str(pdir),
                     '--image_types', 'detected'])
    # a protocol listing an empty slot: the image is listed but missing
    write_protocol(pdir / 'cuhk03_new_protocol_config_detected.mat', 'labeled')
    with pytest.raises(ValueError, match=r"1_001_1_01.png.*listed but missing"):
        cuhk03.main(['--raw_dir', str(raw), '--save_dir', str(tmp_path / 'o5'), '--protocol_dir', str(pdir),
                     '--image_types', 'detected'])
    (tmp_path / 'notmat').mkdir()
    (tmp_path / 'notmat' / 'cuhk-03.mat').write_bytes(b'MATLAB 5.0 MAT-file, not HDF5')
    with pytest.raises(ValueError, match='v7.3'):
        cuhk03.main(['--raw_dir', str(tmp_path / 'notmat'), '--save_dir', str(tmp_path / 'o6'), *proto])
    for o in ('o1', 'o3', 'o4', 'o5', 'o6'):
        assert not (tmp_path / o / 'labeled' / 'partitions.pkl').exists()


def test_bad_image_array(tmp_path):
    (tmp_path / 'raw').mkdir()
    write_mat(tmp_path / 'raw' / 'cuhk-03.mat', float_image=('labeled', 1, 0, 2))
    with pytest.raises(ValueError, match='labeled pair 2 person 1 slot 3: expected an H x W x 3 uint8'):
        cuhk03.main(['--raw_dir', str(tmp_path / 'raw'), '--save_dir', str(tmp_path / 'out'),
                     '--split', 'classic', '--num_val_ids', '1', '--image_types', 'labeled'])
    assert not (tmp_path / 'out' / 'labeled' / 'partitions.pkl').exists()
