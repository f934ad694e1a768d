"""Tests of aligned_reid.checkpoint: load_file, the safe reader (torch's zip and legacy formats and
Python 2 files round-trip exactly, CUDA storages land on the CPU, a file whose pickle would run a
command is refused without running it, unreadable files get one line saying what they look like), the
Python 2 partitions.pkl of the older reproduction through data.read_partitions, the atomic
save_checkpoint and the RNG states."""
import os
import pickle
import random
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch

from aligned_reid import checkpoint, data, engine
from aligned_reid.checkpoint import CheckpointError, load_file
from old_files import (Global, LegacyWriter, Reduce, old_partitions_pickle, py2_dumps, write_py2_torch_file)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def same(a, b):
    """Deep equality of containers holding tensors and numpy arrays."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def train_checkpoint():
    """What script/train.py saves: model and Adam states, scaler None, arguments, RNG states."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    engine.set_seed(3)
    return {'model': net.state_dict(), 'optimizer': opt.state_dict(), 'scaler': None, 'epoch': 4,
            'step_in_epoch': 0, 'best_metric': {'rank1': 0.5, 'split': 'val'},
            'args': {'base_model': 'resnet18', 'resize_h_w': [64, 32], 'staircase_decay_at_epochs': [101, 201],
                     'pretrained_path': None, 'amp': False},
            'rng': [checkpoint.get_rng_state()], 'world_size': 1}


@pytest.mark.parametrize('zip_format', [True, False])
def test_our_checkpoints_round_trip(tmp_path, zip_format):
    obj = train_checkpoint()
    path = tmp_path / 'ckpt.pth'
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_file(path)
    assert same(obj, loaded)
    assert same(checkpoint.load_file(str(path)), obj)
    # the RNG states are usable: restoring them replays the same numbers
    checkpoint.set_rng_state(loaded['rng'][0])
    a = (random.random(), np.random.rand(), torch.rand(2))
    checkpoint.set_rng_state(obj['rng'][0])
    assert same(a, (random.random(), np.random.rand(), torch.rand(2)))


@pytest.mark.parametrize('v2', [False, True])
def test_python2_legacy_file_with_cuda_storages(tmp_path, v2):
    torch.manual_seed(1)
    sd = OrderedDict([('a.weight', torch.randn(3, 4)), ('a.bias', torch.randn(3)),
                      ('n.running_mean', torch.randn(5).double()), ('steps', torch.arange(6))])
    payload = {'state_dicts': [sd], 'ep': 7, 'scores': 0.25, 'note': 'trained on the old code'}
    path = tmp_path / 'old.pth'
    write_py2_torch_file(path, payload, location='cuda:0', v2=v2)
    raw = path.read_bytes()
    assert b'cuda:0' in raw and b'torch.cuda\nFloatStorage' in raw  # the file really names a GPU storage
    assert b'L' + str(0x1950a86a20f9469cfc6c).encode() + b'L\n' in raw  # text-encoded long magic number
    loaded = load_file(path)
    assert loaded['ep'] == 7 and loaded['scores'] == 0.25 and loaded['note'] == 'trained on the old code'
    got = loaded['state_dicts'][0]
    assert isinstance(got, OrderedDict) and list(got) == list(sd)
    for k, v in sd.items():
        assert got[k].device.type == 'cpu' and got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_torch_weights_only_refuses_what_we_read(tmp_path):
    # Why a reader of our own: torch's weights_only loader refuses the Python 2 files.
    path = tmp_path / 'old.pth'
    write_py2_torch_file(path, OrderedDict(w=torch.ones(2)), location='cpu')
    with pytest.raises(Exception):
        torch.load(path, map_location='cpu', weights_only=True)
    assert torch.equal(load_file(path)['w'], torch.ones(2))


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _trap_module(tmp_path, marker):
    """A module on sys.path whose mere import creates `marker`: proves find_class never imported it."""
    (tmp_path / 'interop_trap_module.py').write_text(
        'open({!r}, "w").close()\ndef boom(*a):\n    open({!r}, "w").close()\n'.format(str(marker), str(marker)))
    sys.path.insert(0, str(tmp_path))


def _malicious_files(tmp_path, marker):
    cmd = 'touch {}'.format(marker)
    files = {}
    files['zip_os_system'] = tmp_path / 'zip.pth'
    torch.save({'model': {'w': torch.zeros(1)}, 'args': _RunsCommand(cmd)}, files['zip_os_system'])
    files['legacy_os_system'] = tmp_path / 'legacy.pth'
    torch.save([torch.zeros(1), _RunsCommand(cmd)], files['legacy_os_system'], _use_new_zipfile_serialization=False)
    files['py2_exec'] = tmp_path / 'py2_exec.pth'
    writer = LegacyWriter('cuda:0')
    payload = {b'state_dicts': [writer.state_dict({'w': torch.zeros(2)})],
               b'ep': Reduce(Global('__builtin__', 'eval'), ("__import__('os').system({!r})".format(cmd).encode(),))}
    files['py2_exec'].write_bytes(writer.file_bytes(payload))
    files['py2_builtins_exec'] = tmp_path / 'py2_builtins_exec.pth'
    writer = LegacyWriter('cpu')
    payload = Reduce(Global('builtins', 'exec'), ("open({!r}, 'w').close()".format(str(marker)),))
    files['py2_builtins_exec'].write_bytes(writer.file_bytes(payload))
    files['trap_import'] = tmp_path / 'trap.pth'
    writer = LegacyWriter('cpu')
    files['trap_import'].write_bytes(writer.file_bytes(Reduce(Global('interop_trap_module', 'boom'), ())))
    # a global hidden in a persistent id's storage slot of a zip file is also just a global
    files['zip_nn_module'] = tmp_path / 'module.pth'
    torch.save(torch.nn.Linear(2, 2), files['zip_nn_module'])
    return files


def test_crafted_files_never_run_code(tmp_path):
    marker = tmp_path / 'PWNED'
    _trap_module(tmp_path, marker)
    try:
        files = _malicious_files(tmp_path, marker)
        assert not marker.exists()
        for name, path in files.items():
            with pytest.raises(CheckpointError) as err:
                load_file(path)
            msg = str(err.value)
            assert str(path) in msg and 'refused' in msg and 'nothing from the file was run' in msg, name
            assert '\n' not in msg
            assert not marker.exists(), name
        assert 'interop_trap_module' not in sys.modules
        # and the same files through every entry point
        for path in files.values():
            with pytest.raises(ValueError):
                checkpoint.load_file(str(path))
            with pytest.raises(ValueError):
                checkpoint.load_model(path)
        assert not marker.exists()
        # the crafted payload really would have run (checked once, on a copy, with the unsafe loader)
        torch.load(files['legacy_os_system'], weights_only=False)
        assert marker.exists()
    finally:
        sys.path.remove(str(tmp_path))


def test_refusal_names_the_global(tmp_path):
    path = tmp_path / 'x.pth'
    torch.save({'w': _RunsCommand('true')}, path)
    with pytest.raises(CheckpointError, match=r'asks for (posix|os|nt)\.system'):
        load_file(path)


def test_unreadable_files_get_one_line(tmp_path):
    good = tmp_path / 'good.pth'
    torch.save({'w': torch.randn(1000)}, good)
    legacy = tmp_path / 'legacy.pth'
    torch.save({'w': torch.randn(1000)}, legacy, _use_new_zipfile_serialization=False)
    cases = {
        'empty.pth': (b'', 'empty file'),
        'cut.pth': (good.read_bytes()[:3000], 'truncated zip archive'),
        'cut_legacy.pth': (legacy.read_bytes()[:300], 'truncated or damaged legacy torch file'),
        'photo.pth': (b'\xff\xd8\xff\xe0\x00\x10JFIF\x00' + bytes(100), 'not a torch file: looks like a JPEG image'),
        'page.pth': (b'<!DOCTYPE html><html>Not found</html>', 'looks like an HTML'),
        'notes.pth': (b'model trained on market\n', "looks like text: 'model trained on market'"),
        'parts.pth': (pickle.dumps({'trainval_im_names': []}, protocol=2), 'a plain pickle, not a torch file'),
        'noise.pth': (bytes([0x00, 0x01, 0xfe, 0x80, 0x81]) * 20, 'unknown binary data'),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as err:
            load_file(path)
        assert str(path) in str(err.value) and expected in str(err.value), (name, str(err.value))
        assert '\n' not in str(err.value)
    foreign_zip = tmp_path / 'archive.pth'
    with zipfile.ZipFile(foreign_zip, 'w') as z:
        z.writestr('readme.txt', 'hello')
    with pytest.raises(CheckpointError, match='a zip archive but not a torch file'):
        load_file(foreign_zip)
    script = tmp_path / 'scripted.pt'
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
    with pytest.raises(CheckpointError, match='TorchScript archive'):
        load_file(script)
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        load_file(tmp_path / 'nowhere.pth')


# ----------------------------------------------------------------------------- partitions files

NAMES = {'trainval': ['00000001_0001_00000000.jpg', '00000001_0002_00000000.jpg', '00000007_0003_00000001.jpg'],
         'test': ['00000002_0001_00000000.jpg', '00000002_0002_00000000.jpg', '00000000_0002_00000003.jpg',
                  '00000002_0001_00000001.jpg'],
         'test_marks': [0, 1, 1, 2]}


def test_python2_partitions_file(tmp_path):
    path = tmp_path / 'partitions.pkl'
    path.write_bytes(old_partitions_pickle(NAMES))
    raw = path.read_bytes()
    assert raw[:2] == b'\x80\x02' and b'S26' in raw and b'numpy.core.multiarray\nscalar' in raw
    parts = data.read_partitions(path)
    assert parts['trainval_im_names'] == NAMES['trainval']
    assert parts['test_im_names'] == NAMES['test'] and parts['test_marks'] == NAMES['test_marks']
    assert parts['trainval_ids2labels'] == {1: 0, 7: 1}
    assert all(type(n) is str for n in parts['test_im_names'])


@pytest.mark.parametrize('bad', [Global('os', 'system'), Global('posix', 'system'), Global('__builtin__', 'eval'),
                                 Global('builtins', 'exec'), Global('interop_trap_module', 'boom')])
def test_partitions_file_with_forbidden_global(tmp_path, bad):
    marker = tmp_path / 'PWNED'
    _trap_module(tmp_path, marker)
    try:
        arg = "open({!r}, 'w').close()".format(str(marker)) if bad.name in ('eval', 'exec') else 'touch {}'.format(marker)
        obj = {b'trainval_im_names': [b'00000001_0001_00000000.jpg'], b'trainval_ids2labels': {1: 0},
               b'payload': Reduce(bad, (arg.encode(),) if bad.module != 'interop_trap_module' else ())}
        path = tmp_path / 'partitions.pkl'
        path.write_bytes(py2_dumps(obj))
        with pytest.raises(ValueError, match='partitions.pkl.*refusing to load'):
            data.read_partitions(path)
        assert not marker.exists() and 'interop_trap_module' not in sys.modules
    finally:
        sys.path.remove(str(tmp_path))


# ----------------------------------------------------------------------------- atomic writes, RNG states

def test_checkpoint_roundtrip_and_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / 'sub' / 'ckpt.pth')
    state = {'model': {'w': torch.arange(6.).view(2, 3)}, 'epoch': 3, 'args': {'a': 1}}
    checkpoint.save_checkpoint(state, path)
    back = checkpoint.load_file(path)
    assert back['epoch'] == 3 and torch.equal(back['model']['w'], state['model']['w'])
    assert os.listdir(os.path.dirname(path)) == ['ckpt.pth']  # no temporary left over

    # A crash while writing keeps the previous checkpoint intact and leaves no temporary file.
    def boom(*a, **k):
        raise RuntimeError('disk full')
    monkeypatch.setattr(torch, 'save', boom)
    with pytest.raises(RuntimeError):
        checkpoint.save_checkpoint({'epoch': 4}, path)
    monkeypatch.undo()
    assert checkpoint.load_file(path)['epoch'] == 3
    assert os.listdir(os.path.dirname(path)) == ['ckpt.pth']


def test_load_checkpoint_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        checkpoint.load_file(str(tmp_path / 'nope.pth'))


def test_rng_state_roundtrip():
    engine.set_seed(5)
    state = checkpoint.get_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(7)  # move on
    checkpoint.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
