"""The features file of script/extract.py (aligned_reid.inference: FeaturesWriter beside open_features /
read_features). Written and read back against hand-made arrays; never read as complete unless every row is
right: extract.py killed (SIGKILL) inside a chunk write, just after one, inside the file's assembly and
after it, with loader workers running, then rerun at once; a full filesystem (a real small tmpfs); an
--output that is not a features file. The reference is the bare model on each image and an uninterrupted
extraction."""
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from aligned_reid import data, features_file, inference
from aligned_reid.model import Model
from aligned_reid.synthetic import make_camera, make_identity, render_image
from conftest import REPO, load_script

extract_script = load_script('script', 'extract')
SIZE = (64, 32)
GOOD = 12                     # decodable images; one more file is not an image, so 13 inputs


def _reference(model, paths):
    """The bare model on each image alone: resize, normalise, forward."""
    mean = torch.tensor(data.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(data.IMAGENET_STD)[:, None, None]
    g, loc = [], []
    for p in paths:
        im = Image.open(p).convert('RGB').resize((SIZE[1], SIZE[0]), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.).permute(2, 0, 1)
        with torch.no_grad():
            out = model(((x - mean) / std)[None])
        g.append(out['global'][0].numpy())
        loc.append(out['local'][0].numpy())
    return np.stack(g), np.stack(loc)


def _read(path):
    with h5py.File(str(path), 'r') as f:
        out = {k: f[k][:] for k in ('global', 'local')}
        out.update({k: features_file.decode_text(f[k][:]) for k in ('paths', 'skipped', 'skipped_errors')})
        out['attrs'] = dict(f.attrs)
    return out


def _env():
    """The environment of a subprocess: this repository importable, one thread."""
    return dict(os.environ, OMP_NUM_THREADS='1',
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))


def _run(argv):
    return extract_script.main(extract_script.parse_args([str(a) for a in argv]))


@pytest.fixture(scope='module')
def world(tmp_path_factory, one_torch_thread):
    """A resnet18 checkpoint, 12 synthetic images and a file that is not one, and the uninterrupted
    extraction of them (checked against the bare model)."""
    root = tmp_path_factory.mktemp('features_file')
    torch.manual_seed(0)
    model = Model(base='resnet18', local_conv_out_channels=8).eval()
    ckpt = root / 'ckpt.pth'
    torch.save({'model': model.state_dict(), 'args': {'base_model': 'resnet18', 'local_conv_out_channels': 8,
                                                      'resize_h_w': list(SIZE)}}, str(ckpt))
    images = root / 'images'
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(GOOD):
        render_image(make_identity(0, 1 + k % 4), make_camera(0, 1 + k % 3), rng, im_size=(48, 24)).save(
            str(images / f'{k:03d}.jpg'))
    (images / 'zz_notes.jpg').write_bytes(b'not an image')
    base = ['--model', ckpt, '--images', images, '--device', 'cpu', '--local', '--batch_size', 2,
            '--chunk_size', 2, '--progress', 'false']
    full = root / 'full.h5'
    _run(base + ['--workers', 0, '--output', full])
    want = _read(full)
    good = sorted(str(p) for p in images.glob('0*.jpg'))
    assert want['paths'] == good and want['skipped'] == [str(images / 'zz_notes.jpg')]
    ref_g, ref_l = _reference(model, good)
    np.testing.assert_allclose(want['global'], ref_g, atol=1e-5)
    np.testing.assert_allclose(want['local'], ref_l, atol=1e-5)
    return {'root': root, 'base': base, 'want': want, 'images': images}


def _assert_uninterrupted(path, world):
    """Every row of the file equals the uninterrupted extraction: same paths in the same order (none
    missing, none twice), the same features, the same skipped files."""
    got, want = _read(path), world['want']
    assert got['attrs']['complete'] and got['paths'] == want['paths'] and got['skipped'] == want['skipped']
    assert got['attrs']['rows'] == len(want['paths']) and got['attrs']['num_skipped'] == len(want['skipped'])
    np.testing.assert_allclose(got['global'], want['global'], atol=1e-5)
    np.testing.assert_allclose(got['local'], want['local'], atol=1e-5)


# ----------------------------------------------------------------------------- the writer and the reader

def test_writer_and_reader_agree_on_hand_made_chunks(tmp_path):
    rng = np.random.default_rng(0)
    inputs = [f'im{i}.jpg' for i in range(7)]
    dims = {'global': (5,), 'local': (3, 2)}
    feats = {'global': rng.normal(size=(7, 5)).astype(np.float32),
             'local': rng.normal(size=(7, 3, 2)).astype(np.float32)}
    settings = {'model': 'm.pth', 'flip': False, 'cfg': {'base_model': 'resnet18'}}
    path = tmp_path / 'f.h5'
    # inputs 0-2 kept, 3-4 not decodable, 5-6 kept
    with features_file.FeaturesWriter(path, inputs, settings, dims) as w:
        w.commit(3, inputs[:3], {k: v[:3] for k, v in feats.items()}, [], [])
        w.commit(5, [], {k: v[:0] for k, v in feats.items()}, inputs[3:5], ['bad 3', 'bad 4'])
    with pytest.raises(ValueError, match='unfinished'):
        features_file.read_features(path)
    unfinished = features_file.unfinished_dir(path)
    (tmp_path / 'f.h5.unfinished' / '000000000005-000000000006.npz.tmp.99999').write_bytes(b'half')   # a killed write
    (tmp_path / 'f.h5.unfinished' / '000000000006-000000000007.npz').write_bytes(b'past a gap')
    with features_file.FeaturesWriter(path, inputs, settings, dims) as w:
        assert w.position == 5 and not w.complete
        assert sorted(os.listdir(unfinished)) == ['000000000000-000000000003.npz', '000000000003-000000000005.npz',
                                                  'header.json', 'lock']
        w.commit(7, inputs[5:], {k: v[3:5] for k, v in feats.items()}, [], [])
        w.finish()
    assert not os.path.exists(unfinished)
    got = features_file.read_features(path, local=True)
    assert got['paths'] == inputs[:3] + inputs[5:] and got['skipped'] == inputs[3:5]
    np.testing.assert_array_equal(got['global'], feats['global'][:5])
    np.testing.assert_array_equal(got['local'], feats['local'][:5])
    assert got['settings'] == settings
    with h5py.File(str(path), 'r') as f:
        assert f.attrs['format'] == features_file.FEATURES_FORMAT and f.attrs['num_inputs'] == 7
        assert (f.attrs['rows'], f.attrs['num_skipped']) == (5, 2)
        assert features_file.decode_text(f['skipped_errors'][:]) == ['bad 3', 'bad 4']
    # The same inputs and settings again: complete. Others: refused, naming what differs.
    with features_file.FeaturesWriter(path, inputs, settings, dims) as w:
        assert w.complete
    with pytest.raises(ValueError, match=r'other settings \(flip\).*--overwrite'):
        features_file.FeaturesWriter(path, inputs, dict(settings, flip=True), dims)
    with pytest.raises(ValueError, match=r'other images.*--overwrite'):
        features_file.FeaturesWriter(path, inputs[::-1], settings, dims)


def test_a_damaged_chunk_is_redone_not_read(tmp_path):
    inputs, dims, settings = ['a.jpg', 'b.jpg', 'c.jpg'], {'global': (4,)}, {'model': 'm.pth'}
    path = tmp_path / 'f.h5'
    with features_file.FeaturesWriter(path, inputs, settings, dims) as w:
        w.commit(2, inputs[:2], {'global': np.ones((2, 4))}, [], [])
        w.commit(3, inputs[2:], {'global': np.ones((1, 4))}, [], [])
        (tmp_path / 'f.h5.unfinished' / '000000000000-000000000002.npz').write_bytes(b'damaged from outside')
        with pytest.raises(ValueError, match=r'chunk 000000000000-000000000002\.npz is damaged .* rerun'):
            w.finish()
    assert not path.exists()
    with features_file.FeaturesWriter(path, inputs, settings, dims) as w:
        assert w.position == 0 and w.chunks == []


# ----------------------------------------------------------------------------- killed

DRIVER = r'''
import os, runpy, signal, sys, time
import h5py, numpy as np
from aligned_reid import features_file, inference
point, n, block_from, script = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sys.argv = [script] + sys.argv[5:]
main_pid, count = os.getpid(), [0]

def hit():
    count[0] += 1
    return count[0] == n

def die():
    os.kill(main_pid, signal.SIGKILL)

if point == 'inside_chunk':          # the n-th chunk half on disk
    savez = np.savez
    def half_savez(f, **arrays):
        if hit():
            f.write(b'PK\x03\x04' + bytes(200))
            f.flush()
            die()
        savez(f, **arrays)
    np.savez = half_savez
elif point == 'after_rename':        # the n-th rename of the extraction just done, nothing after it
    replace = os.replace
    def replace_then_die(src, dst):
        replace(src, dst)
        if features_file.UNFINISHED in str(src) and hit():
            die()
    os.replace = replace_then_die
elif point == 'inside_assembly':     # the features file half written, at its n-th dataset write
    setitem = h5py.Dataset.__setitem__
    def setitem_then_die(self, key, value):
        setitem(self, key, value)
        if hit():
            die()
    h5py.Dataset.__setitem__ = setitem_then_die

getitem = inference.ImageFiles.__getitem__
def stuck(self, i):                  # in a loader worker these inputs never finish: only a kill ends it
    if os.getpid() != main_pid and i >= block_from:
        time.sleep(3600)
    return getitem(self, i)
inference.ImageFiles.__getitem__ = stuck
runpy.run_path(script, run_name='__main__')
'''


def _processes_with(marker):
    """pids of the live processes whose command line holds `marker` (zombies left out)."""
    found = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                cmd = f.read()
            with open(f'/proc/{pid}/stat') as f:
                state = f.read().rsplit(')', 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmd and state != 'Z':
            found.append(int(pid))
    return found


# 13 inputs in chunks of 2: renames 1 (header.json), 2-8 (the chunks), 9 (the file into place)
@pytest.mark.parametrize('point, n, block_from', [
    ('inside_chunk', 2, 4),          # chunk [2, 4) half written; the workers are decoding inputs 4 on
    ('inside_assembly', 4, 99),      # every chunk done, the file half written (its 4th dataset write)
    ('after_rename', 9, 99),         # the file renamed into place, its chunks not yet removed
])
def test_killed_extraction_reruns_at_once_to_the_uninterrupted_file(world, tmp_path, point, n, block_from):
    if not sys.platform.startswith('linux'):
        pytest.skip('reads /proc and relies on PR_SET_PDEATHSIG (Linux)')
    out = tmp_path / f'killed_{point}_{n}.h5'            # also the marker of the run's processes
    driver = tmp_path / 'driver.py'
    driver.write_text(DRIVER)
    argv = [str(a) for a in world['base'] + ['--output', out]]
    proc = subprocess.run([sys.executable, str(driver), point, str(n), str(block_from),
                           str(REPO / 'script' / 'extract.py')] + argv + ['--workers', '2'],
                          env=_env(), capture_output=True, text=True, timeout=300)
    try:
        assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
        deadline = time.time() + 60            # the workers get SIGKILL from the kernel as their parent dies
        while _processes_with(str(out)) and time.time() < deadline:
            time.sleep(0.1)
        assert _processes_with(str(out)) == [], 'loader workers outlived the killed extract.py'
    finally:
        for pid in _processes_with(str(out)):
            os.kill(pid, signal.SIGKILL)
    # Nothing reads as complete unless every row is right.
    if out.exists():
        _assert_uninterrupted(out, world)
    else:
        with pytest.raises(ValueError, match='unfinished'):
            features_file.read_features(out)
    _run(argv + ['--workers', 0])                # at once, in the same folder
    _assert_uninterrupted(out, world)
    assert not os.path.exists(features_file.unfinished_dir(out))


# ----------------------------------------------------------------------------- a full disk

@pytest.fixture
def small_fs(tmp_path):
    """A real 1 MiB tmpfs (root only: skipped where mounting is not permitted), unmounted afterwards."""
    mnt = tmp_path / 'small'
    mnt.mkdir()
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f'cannot mount a tmpfs here (needs root): {r.stderr.strip()}')
    try:
        yield mnt
    finally:
        subprocess.run(['umount', str(mnt)], check=False)


def _fill(folder, leave_pages):
    """A file taking all the free space of folder's filesystem but `leave_pages` pages of 4 KiB."""
    st = os.statvfs(str(folder))
    filler = folder / 'filler'
    with open(str(filler), 'wb') as f:
        f.write(bytes(st.f_bavail * st.f_frsize - leave_pages * 4096))
    return filler


def test_full_disk_stops_with_one_line_and_the_rerun_completes(world, small_fs, tmp_path):
    # A chunk that does not fit: one line, the earlier chunks kept, nothing readable as complete.
    out = small_fs / 'a.h5'
    filler = _fill(small_fs, 3)                 # the header (a page) and a chunk or so
    with pytest.raises(OSError, match=r'No space left on device.*kept in .*a\.h5\.unfinished'):
        _run(world['base'] + ['--workers', 0, '--output', out])
    assert not out.exists()
    with pytest.raises(ValueError, match='unfinished'):
        features_file.read_features(out)
    filler.unlink()
    _run(world['base'] + ['--workers', 0, '--output', out])
    _assert_uninterrupted(out, world)
    out.unlink()

    # Every chunk fits but the assembled file does not. Its size is checked first: one line.
    out = small_fs / 'b.h5'
    _run(world['base'] + ['--workers', 0, '--output', out, '--max_images', GOOD])   # the last input is left
    filler = _fill(small_fs, 2)                # its chunk (no rows) fits, the file does not
    with pytest.raises(OSError, match=r'b\.h5: cannot write it \(about [\d,]+ bytes are needed'
                                                           r'.*first 13 of 13 inputs are kept'):
        _run(world['base'] + ['--workers', 0, '--output', out])
    # Past that check (here: skipped) HDF5 meets the full disk itself. In a process of its own, which must end
    # with one line (no h5py traceback, no crash at exit) and leave the chunks for the rerun.
    skip_check = ('import runpy, sys; from aligned_reid import features_file; features_file._free_bytes = lambda d: 1 << 50; '
                  "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, '-c', skip_check, str(REPO / 'script' / 'extract.py')]
                          + [str(a) for a in world['base']] + ['--workers', '0', '--output', str(out)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('extract.py: '), lines
    assert 'cannot write it (No space left on device)' in lines[0] and 'first 13 of 13 inputs are kept' in lines[0]
    assert not out.exists() and not [n for n in os.listdir(features_file.unfinished_dir(out)) if '.tmp' in n]
    with pytest.raises(ValueError, match='unfinished'):
        features_file.read_features(out)
    filler.unlink()
    _run(world['base'] + ['--workers', 0, '--output', out])
    _assert_uninterrupted(out, world)


# ----------------------------------------------------------------------------- not a features file

def test_output_that_is_not_a_features_file_is_refused_in_one_line(world, tmp_path):
    image = tmp_path / 'photo.h5'
    image.write_bytes((world['images'] / '000.jpg').read_bytes())
    with pytest.raises(ValueError, match=r'photo\.h5: exists and is a JPEG image; pass --overwrite'):
        _run(world['base'] + ['--workers', 0, '--output', image])
    damaged = tmp_path / 'damaged.h5'
    blob = (world['root'] / 'full.h5').read_bytes()
    damaged.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(ValueError, match=r'damaged\.h5: exists and is a damaged HDF5 file .*--overwrite'):
        _run(world['base'] + ['--workers', 0, '--output', damaged])
    for path, what in ((image, 'a JPEG image'), (damaged, 'a damaged HDF5 file')):
        with pytest.raises(ValueError, match=what):
            features_file.read_features(path)
        assert path.read_bytes()[:4] in (blob[:4], b'\xff\xd8\xff\xe0')          # left as it was
    _run(world['base'] + ['--workers', 0, '--output', damaged, '--overwrite'])
    _assert_uninterrupted(damaged, world)
