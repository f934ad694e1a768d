"""Edges of script/search.py and script/export_onnx.py (and extract.py's output check): features of
different models refused in one line naming both sides, outputs that cannot be written refused before the
work, a --shortlist below --top_k refused, the ONNX check relative to the feature scale with the file written
only after it passes and the preprocessing in its metadata."""
import json
import os
import subprocess

import h5py
import numpy as np
import pytest
import torch

from aligned_reid import features_file, inference
from aligned_reid.model import Model
from aligned_reid.synthetic import make_camera, make_identity, render_image
from conftest import load_script

extract_script = load_script('script', 'extract')
search_script = load_script('script', 'search')
export_script = load_script('script', 'export_onnx')
SIZE = (64, 32)


def _checkpoint(path, seed, scale=None):
    """A resnet18 train.py-style checkpoint; `scale` multiplies the last block's output (features ~ scale)."""
    torch.manual_seed(seed)
    model = Model(base='resnet18', local_conv_out_channels=8).eval()
    if scale:
        with torch.no_grad():
            bn = model.base.layer4[-1].bn2
            bn.weight.mul_(scale)
            bn.bias.mul_(scale)
    torch.save({'model': model.state_dict(), 'args': {'base_model': 'resnet18', 'local_conv_out_channels': 8,
                                                      'resize_h_w': list(SIZE)}}, str(path))
    return path


@pytest.fixture(scope='module')
def world(tmp_path_factory, one_torch_thread):
    """Checkpoints a and b (same architecture, other weights), six images, and features files: query and
    gallery of a, gallery of b, and a gallery of a resnet50 (2,048-d global features)."""
    root = tmp_path_factory.mktemp('edges')
    a, b = _checkpoint(root / 'a.pth', 0), _checkpoint(root / 'b.pth', 1)
    images = root / 'images'
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        render_image(make_identity(0, 1 + k % 3), make_camera(0, 1 + k % 2), rng, im_size=(48, 24)).save(
            str(images / f'{k:03d}.jpg'))
    files = {}
    for name, ckpt in (('q_a', a), ('g_a', a), ('g_b', b)):
        files[name] = root / f'{name}.h5'
        extract_script.main(extract_script.parse_args([
            '--model', str(ckpt), '--images', str(images), '--output', str(files[name]), '--local', '--device', 'cpu',
            '--workers', '0', '--progress', 'false']))
    files['g_50'] = root / 'g_50.h5'
    paths = [str(p) for p in sorted(images.iterdir())]
    settings = {'model': '/elsewhere/r50.pth', 'weights': 'f' * 64, 'flip': False, 'local': True,
                'cfg': {'base_model': 'resnet50', 'resize_h_w': list(SIZE), 'normalize_feature': False}}
    with h5py.File(str(files['g_50']), 'w') as f:           # as docs/trained-model.md describes the file
        text = h5py.string_dtype('utf-8')
        f.create_dataset('paths', data=paths, dtype=text)
        f['global'], f['local'] = np.ones((6, 2048), np.float32), np.ones((6, 2, 8), np.float32)
        f.create_dataset('skipped', (0,), dtype=text)
        f.create_dataset('skipped_errors', (0,), dtype=text)
        f.attrs.update({'format': features_file.FEATURES_FORMAT, 'settings': json.dumps(settings), 'complete': True,
                        'num_inputs': 6, 'rows': 6, 'num_skipped': 0})
    return {'root': root, 'a': a, 'b': b, 'images': images, **files}


def _search(argv):
    return search_script.main(search_script.parse_args([str(v) for v in argv] + ['--device', 'cpu', '--workers', '0']))


# ----------------------------------------------------------------------------- features of other models

def test_search_refuses_features_of_different_models(world, tmp_path):
    out = tmp_path / 'r.csv'
    with pytest.raises(ValueError, match=r'--query \S+q_a\.h5 \(resnet18, global 512, weights \w+\) and '
                                         r'--gallery \S+g_50\.h5 \(resnet50, global 2048, weights f+\) hold '
                                         r'features of different models \(global features of 512 and 2048\)'):
        _search(['--query', world['q_a'], '--gallery', world['g_50'], '--output', out])
    pytest.importorskip('faiss')
    with pytest.raises(ValueError, match='different models'):
        _search(['--query', world['q_a'], '--gallery', world['g_50'], '--output', out, '--faiss_index', 'Flat'])
    # The same stripe shape, other weights: the local distance used to run on them silently.
    with pytest.raises(ValueError, match=r'q_a\.h5 .* and --gallery \S+g_b\.h5 .* different models \(other weights\)'):
        _search(['--query', world['q_a'], '--gallery', world['g_b'], '--output', out, '--distance', 'local'])
    # Images extracted now with model b against a gallery file of model a.
    with pytest.raises(ValueError, match=r'--query \S+images .* and --gallery \S+g_a\.h5 .*\(other weights\)'):
        _search(['--query', world['images'], '--model', world['b'], '--gallery', world['g_a'], '--output', out])
    assert not out.exists()
    # The same model (a file moved elsewhere, images against a file): searched.
    moved = tmp_path / 'moved.h5'
    moved.write_bytes(world['g_a'].read_bytes())
    q_paths, g_paths, index, dist = _search(['--query', world['q_a'], '--gallery', moved, '--output', out,
                                             '--distance', 'local', '--top_k', 3])
    np.testing.assert_array_equal(index[:, 0], np.arange(6))     # each image finds itself first
    _search(['--query', world['images'], '--model', world['a'], '--gallery', world['g_a'], '--output', out])
    assert out.exists()


# ----------------------------------------------------------------------------- outputs that cannot be written

@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only tmpfs (what os.access cannot hide from root), or None where mounting is not permitted."""
    mnt = tmp_path / 'ro'
    mnt.mkdir()
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro,size=64k', 'tmpfs', str(mnt)], capture_output=True)
    if r.returncode:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(['umount', str(mnt)], check=False)


def test_unwritable_outputs_are_refused_before_the_work(world, tmp_path, capsys, read_only_folder):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    folders = [(blocker, 'is not a folder')]
    if read_only_folder is not None:
        folders.append((read_only_folder, 'is not writable'))
    for folder, why in folders:
        runs = [
            (extract_script, ['--model', world['a'], '--images', world['images'], '--output', folder / 'f.h5'],
             '--output'),
            (search_script, ['--query', world['q_a'], '--gallery', world['g_a'], '--output', folder / 'r.csv'],
             '--output'),
            (search_script, ['--query', world['q_a'], '--gallery', world['g_a'], '--output', tmp_path / 'r.csv',
                             '--num_vis_queries', '1', '--vis_dir', folder / 'pictures'], '--vis_dir'),
            (export_script, ['--model', world['a'], '--output', folder / 'm.onnx'], '--output'),
        ]
        for script, argv, flag in runs:
            with pytest.raises(SystemExit):
                script.parse_args([str(v) for v in argv])
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert flag in err and str(folder) in err and why in err, err


# ----------------------------------------------------------------------------- --shortlist

def test_shortlist_below_top_k_is_refused(world, tmp_path, capsys):
    argv = ['--query', str(world['q_a']), '--gallery', str(world['g_a']), '--output', str(tmp_path / 'r.csv'),
            '--top_k', '10', '--shortlist', '5']
    with pytest.raises(SystemExit):
        search_script.parse_args(argv + ['--faiss_index', 'Flat'])
    assert '--shortlist 5 is below --top_k 10' in capsys.readouterr().err
    assert search_script.parse_args(argv).shortlist == 5              # no faiss stage: no shortlist used


# ----------------------------------------------------------------------------- ONNX export

def test_onnx_tolerance_is_relative_and_the_file_is_written_after_the_check(world, tmp_path, monkeypatch, capsys):
    import onnx
    big = _checkpoint(tmp_path / 'big.pth', 2, scale=1e5)      # features ~ 1e5: float32 steps of ~0.01
    out = tmp_path / 'big.onnx'
    made, export = [], export_script.export

    def export_and_keep(*args):
        made.append(export(*args))
        return made[-1]
    monkeypatch.setattr(export_script, 'export', export_and_keep)
    path, relative = export_script.main(export_script.parse_args(['--model', str(big), '--output', str(out)]))
    assert path == str(out) and relative <= 1e-4
    log = capsys.readouterr().out
    model = export_script.FeatureExtractor(str(big)).model
    absolute, rel, _ = export_script.differences(model, str(out), torch.randn(3, 3, *SIZE))
    assert absolute > 1e-4 and rel <= 1e-4          # an absolute tolerance of 1e-4 would have failed it
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta['resize_h_w']) == list(SIZE)
    assert json.loads(meta['mean']) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(meta['std']) == pytest.approx([0.229, 0.224, 0.225])
    assert '[0.485, 0.456, 0.406]' in log and '[0.229, 0.224, 0.225]' in log
    # A check that fails writes nothing (the exported graph is reused: no second export).
    monkeypatch.setattr(export_script, 'export', lambda *args: made[0])
    failed = tmp_path / 'failed.onnx'
    with pytest.raises(SystemExit, match=r'differs from PyTorch .* > --tolerance 1e-12; \S+failed\.onnx not written'):
        export_script.main(export_script.parse_args(['--model', str(big), '--output', str(failed),
                                                     '--tolerance', '1e-12']))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('failed.onnx')]   # nor a temporary
