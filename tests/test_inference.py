"""Tests of using a trained model: FeatureExtractor, script/extract.py (HDF5 output, resume, bad files),
script/search.py and script/export_onnx.py, against references: the bare model forward,
evaluation.extract_features, brute-force rankings (conftest.py). The top-k search itself is in
test_distance.py."""
import os

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from aligned_reid import data, evaluation, features_file, inference
from aligned_reid.model import Model
from aligned_reid.synthetic import make_camera, make_identity, render_image
from conftest import brute_dist, brute_global_dist, load_script

extract_script = load_script('script', 'extract')
SIZE = (64, 32)


@pytest.fixture(scope='module')
def world(tmp_path_factory, one_torch_thread):
    """A resnet18 train.py-style checkpoint in an experiment folder, synthetic images (nested
    folders, prepared names) with three bad files, and a partitions.pkl over the good ones."""
    root = tmp_path_factory.mktemp('infer')
    torch.manual_seed(0)
    model = Model(base='resnet18', local_conv_out_channels=16)
    with torch.no_grad():                       # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    exp = root / 'exp'
    exp.mkdir()
    args = {'base_model': 'resnet18', 'last_stride': 2, 'local_conv_out_channels': 16,
            'resize_h_w': list(SIZE), 'normalize_feature': False}
    torch.save({'model': model.state_dict(), 'args': args, 'epoch': 1}, str(exp / 'ckpt.pth'))
    images = root / 'dataset' / 'images'
    (images / 'sub' / 'deeper').mkdir(parents=True)
    names = []
    rng = np.random.default_rng(0)
    for k in range(11):
        pid, cam = 1 + k % 4, 1 + k % 3
        name = data.make_im_name(pid, cam, k)
        folder = images if k < 7 else images / 'sub' / ('deeper' if k % 2 else '')
        render_image(make_identity(0, pid), make_camera(0, cam), rng, im_size=(48, 24)).save(
            str(folder / name))
        names.append(os.path.relpath(str(folder / name), str(images)))
    (images / 'notes.txt').write_text('not an image\n')
    (images / 'sub' / 'broken.jpg').write_bytes((images / names[0]).read_bytes()[:60])
    (images / 'sub' / 'empty.png').write_bytes(b'')
    flat = root / 'flat'
    flat.mkdir()
    for n in names:
        os.link(str(images / n), str(flat / os.path.basename(n)))
    test_names = sorted(os.path.basename(n) for n in names)
    parts = {'trainval_im_names': test_names, 'trainval_ids2labels': {1: 0, 2: 1, 3: 2, 4: 3},
             'test_im_names': test_names, 'test_marks': [k % 2 for k in range(len(names))]}
    # partitions_images_dir(<dir>/partitions.pkl) is <dir>/images: build that layout
    prepared = root / 'prepared'
    prepared.mkdir()
    os.symlink(str(flat), str(prepared / 'images'))
    data.write_partitions(parts, str(prepared / 'partitions.pkl'))
    return {'root': root, 'exp': exp, 'ckpt': exp / 'ckpt.pth', 'images': images, 'model': model.eval(),
            'good': sorted(str(images / n) for n in names), 'partitions': prepared / 'partitions.pkl',
            'flat': flat, 'parts': parts}


def _reference(model, paths, flip=False):
    """The bare model on each image alone: resize, normalise, forward (and mirrored forward)."""
    mean = torch.tensor(data.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(data.IMAGENET_STD)[:, None, None]
    g, loc = [], []
    for p in paths:
        im = p if isinstance(p, Image.Image) else Image.open(p).convert('RGB')
        im = im.convert('RGB').resize((SIZE[1], SIZE[0]), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.).permute(2, 0, 1)
        x = ((x - mean) / std)[None]
        with torch.no_grad():
            out = model(x)
            if flip:
                out2 = model(x.flip(3))
                out = {k: (out[k] + out2[k]) / 2 for k in ('global', 'local')}
        g.append(out['global'][0].numpy())
        loc.append(out['local'][0].numpy())
    return np.stack(g), np.stack(loc)


def test_extractor_on_pil_images_and_paths(world):
    ext = inference.FeatureExtractor(str(world['exp']), device='cpu', batch_size=4)   # the folder
    assert ext.path == str(world['ckpt']) and ext.cfg['resize_h_w'] == list(SIZE)
    assert ext.cfg['size_from_checkpoint'] is True
    paths = world['good'][:6]
    ref_g, ref_l = _reference(world['model'], paths)
    by_path = ext(paths, local=True)
    assert by_path['global'].shape == (6, 512) and by_path['local'].shape == (6, 2, 16)
    np.testing.assert_allclose(by_path['global'], ref_g, atol=1e-5)
    np.testing.assert_allclose(by_path['local'], ref_l, atol=1e-5)
    pil = [Image.open(p) for p in paths]
    by_pil = ext(pil)
    assert set(by_pil) == {'global'}
    np.testing.assert_allclose(by_pil['global'], ref_g, atol=1e-5)
    one = ext(paths[2], as_numpy=False)
    assert torch.is_tensor(one['global']) and one['global'].shape == (1, 512)
    np.testing.assert_allclose(one['global'].numpy(), ref_g[2:3], atol=1e-5)
    flipped = inference.FeatureExtractor(str(world['ckpt']), device='cpu', flip=True)(paths, local=True)
    fg, fl = _reference(world['model'], paths, flip=True)
    np.testing.assert_allclose(flipped['global'], fg, atol=1e-5)
    np.testing.assert_allclose(flipped['local'], fl, atol=1e-5)
    assert ext([])['global'].shape == (0, 512)
    with pytest.raises(ValueError, match='notes.txt'):
        ext([paths[0], str(world['images'] / 'notes.txt')])
    with pytest.raises(FileNotFoundError, match='without ckpt.pth'):
        inference.FeatureExtractor(str(world['root']))


def test_load_model_layouts(world, tmp_path):
    from aligned_reid.checkpoint import load_model
    torch.manual_seed(1)
    other = Model(base='resnet18', local_conv_out_channels=16).eval()
    args = {'base_model': 'resnet18', 'local_conv_out_channels': 16, 'resize_h_w': list(SIZE)}
    ml = tmp_path / 'ml.pth'
    torch.save({'model': world['model'].state_dict(), 'models': [world['model'].state_dict(), other.state_dict()],
                'args': args}, str(ml))
    x = torch.randn(2, 3, *SIZE)
    model, cfg = load_model(str(ml), model_index=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x)['global'], other(x)['global'])
    assert cfg['layout'].startswith('train_ml.py checkpoint, model 2 of 2') and cfg['base_model'] == 'resnet18'
    with pytest.raises(ValueError, match='model_index 3'):
        load_model(str(ml), model_index=3)
    bare = tmp_path / 'bare.pth'
    torch.save({'module.' + k: v for k, v in other.state_dict().items()}, str(bare))
    model, cfg = load_model(str(bare), overrides={'base_model': 'resnet18', 'local_conv_out_channels': 16,
                                                  'resize_h_w': [64, 32], 'last_stride': None})
    assert cfg['layout'] == 'plain state dict' and cfg['size_from_checkpoint'] is True and cfg['last_stride'] == 2
    assert cfg['mean'] == list(data.IMAGENET_MEAN) and cfg['std'] == list(data.IMAGENET_STD)
    with torch.no_grad():
        torch.testing.assert_close(model(x)['local'], other(x)['local'])
    assert load_model(str(bare))[1]['base_model'] == 'resnet18'   # the architecture is read from the weights
    with pytest.raises(ValueError, match='resnet50'):
        load_model(str(bare), overrides={'base_model': 'resnet50'})


def _run(args, capsys=None):
    return extract_script.main(extract_script.parse_args(args))


def _read(path):
    with h5py.File(str(path), 'r') as f:
        out = {k: f[k][:] for k in ('paths', 'global', 'skipped', 'skipped_errors')}
        if 'local' in f:
            out['local'] = f['local'][:]
        out['complete'] = bool(f.attrs['complete'])
    out['paths'] = [p.decode() for p in out['paths']]
    out['skipped'] = [p.decode() for p in out['skipped']]
    return out


def test_extract_partitions_equals_extract_features(world, tmp_path):
    out = tmp_path / 'test.h5'
    _run(['--model', str(world['ckpt']), '--partitions', str(world['partitions']), '--split', 'test',
          '--output', str(out), '--local', '--flip', '--device', 'cpu', '--batch_size', '3', '--workers', '0',
          '--progress', 'false'])
    got = _read(out)
    im_dir = data.partitions_images_dir(str(world['partitions']))
    loader = data.make_test_loader(im_dir, world['parts']['test_im_names'], world['parts']['test_marks'],
                                   data.build_transform(SIZE, train=False), batch_size=5, workers=0)
    want = evaluation.extract_features(world['model'], loader, 'cpu', flip=True, progress=False)
    assert got['paths'] == [os.path.join(im_dir, n) for n in world['parts']['test_im_names']]
    assert got['complete'] and got['skipped'] == []
    np.testing.assert_allclose(got['global'], want['global'], atol=1e-5)
    np.testing.assert_allclose(got['local'], want['local'], atol=1e-5)


def test_interrupted_extraction_continues_to_the_same_file(world, tmp_path, capsys):
    base = ['--model', str(world['exp']), '--images', str(world['images']), '--device', 'cpu', '--local',
            '--batch_size', '3', '--chunk_size', '2', '--workers', '0', '--progress', 'false']
    full = tmp_path / 'full.h5'
    _run(base + ['--output', str(full)])
    want = _read(full)
    assert want['complete'] and want['paths'] == world['good']
    assert sorted(os.path.basename(p) for p in want['skipped']) == ['broken.jpg', 'empty.png', 'notes.txt']
    assert all(e for e in want['skipped_errors'])
    assert '3 files skipped' in capsys.readouterr().out

    part = tmp_path / 'part.h5'
    _run(base + ['--output', str(part), '--max_images', '5'])
    unfinished = features_file.unfinished_dir(part)
    assert not part.exists()
    assert sorted(os.listdir(unfinished)) == ['000000000000-000000000003.npz', '000000000003-000000000005.npz',
                                              'header.json', 'lock']
    out = capsys.readouterr().out
    assert 'rerun the same command to continue' in out
    # A run killed while writing a chunk leaves a temporary file: simulate one.
    with open(os.path.join(unfinished, '000000000005-000000000007.npz.tmp.99999'), 'wb') as f:
        f.write(b'PK\x03\x04 half a chunk')
    _run(base + ['--output', str(part), '--max_images', '4'])
    assert 'continuing' in capsys.readouterr().out
    _run(base + ['--output', str(part)])
    got = _read(part)
    assert got['complete'] and got['paths'] == want['paths'] and got['skipped'] == want['skipped']
    # Batches are cut differently after a restart, which changes float rounding, not values.
    np.testing.assert_allclose(got['global'], want['global'], atol=1e-5)
    np.testing.assert_allclose(got['local'], want['local'], atol=1e-5)
    # The uninterrupted file equals the model on each image.
    ref_g, ref_l = _reference(world['model'], world['good'])
    np.testing.assert_allclose(want['global'], ref_g, atol=1e-5)
    np.testing.assert_allclose(want['local'], ref_l, atol=1e-5)
    # A complete file is left alone; other settings are refused, naming the flag.
    _run(base + ['--output', str(part)])
    assert 'is complete' in capsys.readouterr().out
    with pytest.raises(ValueError, match=r'settings \(flip\).*--overwrite'):
        _run(base + ['--output', str(part), '--flip'])
    _run(base + ['--output', str(part), '--flip', '--overwrite'])
    assert _read(part)['complete']


def test_extraction_killed_mid_run_resumes(world, tmp_path):
    """SIGKILL while extract.py writes (one image per chunk, so a write is nearly always under way),
    then the same command again: the file holds every image's features, as the bare model gives them."""
    import signal
    import subprocess
    import sys
    import time
    folder = tmp_path / 'many'
    folder.mkdir()
    for i in range(32):
        os.link(world['good'][i % len(world['good'])], str(folder / f'{i:03d}.jpg'))
    argv = ['--model', str(world['ckpt']), '--images', str(folder), '--device', 'cpu', '--batch_size', '1',
            '--chunk_size', '1', '--workers', '0', '--progress', 'false']
    out = tmp_path / 'killed.h5'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join(
        [str(extract_script.__file__).rsplit(os.sep, 2)[0], os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.Popen([sys.executable, extract_script.__file__] + argv + ['--output', str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    unfinished = features_file.unfinished_dir(out)
    while time.time() < deadline and proc.poll() is None and not (
            os.path.isdir(unfinished) and len(os.listdir(unfinished)) > 4):
        time.sleep(0.05)                # a few chunks are written
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if killed:                          # (a very fast machine may finish first: then only the rerun is checked)
        assert not out.exists()
        with pytest.raises(ValueError, match='unfinished'):
            features_file.read_features(str(out))
    _run(argv + ['--output', str(out)])
    got = _read(out)
    assert got['complete'] and got['paths'] == sorted(str(p) for p in folder.iterdir())
    ref_g, ref_l = _reference(world['model'], got['paths'])
    np.testing.assert_allclose(got['global'], ref_g, atol=1e-5)


def test_extract_from_a_list_file_and_bad_flags(world, tmp_path, capsys):
    lst = world['root'] / 'list.txt'
    rel = [os.path.relpath(p, str(world['root'])) for p in world['good'][:3]]
    lst.write_text('# three images and a missing one\n' + '\n'.join(rel) + '\nmissing.jpg\n\n')
    out = tmp_path / 'list.h5'
    _run(['--model', str(world['ckpt']), '--images', str(lst), '--output', str(out), '--device', 'cpu',
          '--workers', '0', '--progress', 'false'])
    got = _read(out)
    assert got['paths'] == world['good'][:3] and 'local' not in got
    assert got['skipped'] == [str(world['root'] / 'missing.jpg')]
    assert 'No such file' in got['skipped_errors'][0].decode()
    feats = features_file.read_features(str(out))
    np.testing.assert_array_equal(feats['global'], got['global'])
    with pytest.raises(ValueError, match='no local features'):
        features_file.read_features(str(out), local=True)
    for argv, message in ((['--images', 'nope'], '--images: no such folder or file'),
                          (['--images', str(lst), '--batch_size', '0'], '--batch_size'),
                          (['--partitions', 'x.pkl'], '--partitions: file not found')):
        with pytest.raises(SystemExit):
            extract_script.parse_args(['--model', str(world['ckpt']), '--output', str(out)] + argv)
        assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- script/search.py

search_script = load_script('script', 'search')


def _read_csv(path):
    import csv
    with open(str(path), newline='') as f:
        rows = list(csv.DictReader(f))
    out = {}
    for r in rows:
        out.setdefault(r['query'], []).append((int(r['rank']), r['gallery'], float(r['distance'])))
    return out


def test_search_ranks_equal_brute_force(world, tmp_path):
    good = world['good']
    queries, gallery = good[:3], good[3:]
    qlist = tmp_path / 'queries.txt'
    qlist.write_text('\n'.join(queries) + '\n')
    gdir = tmp_path / 'gallery'
    gdir.mkdir()
    for p in gallery:
        os.link(p, str(gdir / os.path.basename(p)))
    (gdir / 'readme.txt').write_text('not an image')
    g_paths = sorted(str(gdir / os.path.basename(p)) for p in gallery)
    qg, ql = _reference(world['model'], queries)
    gg, gl = _reference(world['model'], g_paths)
    q, g = {'global': qg, 'local': ql}, {'global': gg, 'local': gl}
    common = ['--model', str(world['exp']), '--device', 'cpu', '--workers', '0', '--top_k', '4']
    for distance in ('global', 'global_local'):
        ref = brute_dist(q, g, distance)
        want = np.argsort(ref, axis=1, kind='stable')[:, :4]
        out = tmp_path / f'{distance}.csv'
        search_script.main(search_script.parse_args(common + [
            '--query', str(qlist), '--gallery', str(gdir), '--distance', distance, '--output', str(out),
            '--gallery_block', '3']))
        got = _read_csv(out)
        assert list(got) == queries
        for i, qp in enumerate(queries):
            assert [r[0] for r in got[qp]] == [1, 2, 3, 4]
            assert [r[1] for r in got[qp]] == [g_paths[j] for j in want[i]]
            np.testing.assert_allclose([r[2] for r in got[qp]], ref[i, want[i]], rtol=1e-4, atol=1e-4)

    # The gallery as a features file of extract.py: same ranking, JSON output, pictures.
    h5 = tmp_path / 'gallery.h5'
    _run(['--model', str(world['ckpt']), '--images', str(gdir), '--output', str(h5), '--local', '--device', 'cpu',
          '--workers', '0', '--progress', 'false'])
    ref = brute_dist(q, g, 'local')
    want = np.argsort(ref, axis=1, kind='stable')[:, :4]
    out = tmp_path / 'local.json'
    search_script.main(search_script.parse_args(common + [
        '--query', str(qlist), '--gallery', str(h5), '--distance', 'local', '--output', str(out),
        '--num_vis_queries', '2']))
    import json
    got = json.loads(out.read_text())
    assert [r['query'] for r in got] == queries
    for i, r in enumerate(got):
        assert [x['gallery'] for x in r['results']] == [g_paths[j] for j in want[i]]
    pics = sorted(os.listdir(str(tmp_path / 'local_ranks')))
    assert pics == ['query_00000.png', 'query_00001.png']
    im = Image.open(str(tmp_path / 'local_ranks' / pics[0])).convert('RGB')
    from aligned_reid import visualize
    cell_w = 64 + 2 * 4
    assert im.getpixel((12 + cell_w + 1, 1)) == visualize.NEUTRAL_COLOR      # first gallery frame

    # Re-ranking: the k-reciprocal matrix of the brute-force distances, ranked.
    from aligned_reid.re_ranking import re_ranking
    rr = re_ranking(brute_dist(q, g, 'global'), brute_dist(q, q, 'global'), brute_dist(g, g, 'global'), k1=3, k2=2)
    want = np.argsort(rr, axis=1, kind='stable')[:, :4]
    out = tmp_path / 'rr.csv'
    search_script.main(search_script.parse_args(common + [
        '--query', str(qlist), '--gallery', str(h5), '--re_rank', '--k1', '3', '--k2', '2', '--output', str(out)]))
    got = _read_csv(out)
    for i, qp in enumerate(queries):
        assert [r[1] for r in got[qp]] == [g_paths[j] for j in want[i]]


def test_search_with_faiss_shortlist(world, tmp_path):
    pytest.importorskip('faiss')
    rng = np.random.default_rng(5)
    q = rng.normal(size=(6, 16)).astype(np.float32)
    g = rng.normal(size=(50, 16)).astype(np.float32)
    g[7] = g[3]                                                      # an exact tie: lower index first
    paths = {}
    for name, feats in (('q', q), ('g', g)):
        paths[name] = tmp_path / f'{name}.h5'
        with h5py.File(str(paths[name]), 'w') as f:
            f.create_dataset('paths', data=[f'{name}{i}.jpg' for i in range(len(feats))],
                             dtype=h5py.string_dtype('utf-8'))
            f['global'] = feats
            f.create_dataset('skipped', (0,), dtype=h5py.string_dtype('utf-8'))
            f.attrs.update({'format': features_file.FEATURES_FORMAT, 'complete': True,
                            'settings': '{"model": "m", "cfg": {"normalize_feature": false, "resize_h_w": [64, 32]}}'})
    ref = brute_global_dist(q, g)
    want = np.argsort(ref, axis=1, kind='stable')[:, :5]
    # Every list visited (nprobe = nlist), so the shortlist holds the exact top-k: the result must be exact;
    # under a PCA pre-transform the shortlist of 50 is the whole gallery only if nprobe reaches the IVF.
    for extra in ([], ['--faiss_index', 'Flat', '--shortlist', '50'],
                  ['--faiss_index', 'IVF4,Flat', '--faiss_nprobe', '4'],
                  ['--faiss_index', 'PCA8,IVF4,Flat', '--faiss_nprobe', '4', '--shortlist', '50']):
        out = tmp_path / 'f.csv'
        search_script.main(search_script.parse_args(['--query', str(paths['q']), '--gallery', str(paths['g']),
                                                     '--output', str(out), '--top_k', '5', '--device', 'cpu']
                                                    + extra))
        got = _read_csv(out)
        for i in range(6):
            assert [r[1] for r in got[f'q{i}.jpg']] == [f'g{j}.jpg' for j in want[i]], extra


def test_search_bad_flags(world, tmp_path, capsys):
    for argv, message in (
            (['--query', 'nope', '--gallery', str(world['images'])], '--query: no such folder or file'),
            (['--query', str(world['images']), '--gallery', str(world['images'])], '--model is needed'),
            (['--query', str(world['images']), '--gallery', str(world['images']), '--model', str(world['exp']),
              '--re_rank', '--faiss_index', 'Flat'], '--re_rank needs the exact distances')):
        with pytest.raises(SystemExit):
            search_script.parse_args(argv + ['--output', str(tmp_path / 'o.csv')])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        search_script.parse_args(['--query', str(world['images']), '--gallery', str(world['images']),
                                  '--model', str(world['exp']), '--output', 'o.txt'])
    assert '--output must end in .csv or .json' in capsys.readouterr().err


# ----------------------------------------------------------------------------- script/export_onnx.py

export_script = load_script('script', 'export_onnx')


def test_onnx_export_matches_pytorch(world, tmp_path, monkeypatch, capsys):
    import onnxruntime as ort
    out = tmp_path / 'net.onnx'
    path, diff = export_script.main(export_script.parse_args(['--model', str(world['exp']), '--output', str(out)]))
    assert path == str(out) and diff <= 1e-4
    assert 'largest difference' in capsys.readouterr().out
    # The dynamic batch axis: real images, batch sizes other than the export's, against the bare model.
    session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    ext = inference.FeatureExtractor(str(world['ckpt']))
    for n in (1, 5):
        images = torch.stack([ext.preprocess(p) for p in world['good'][:n]])
        g, loc = session.run(['global', 'local'], {'images': images.numpy()})
        ref_g, ref_l = _reference(world['model'], world['good'][:n])
        np.testing.assert_allclose(g, ref_g, atol=1e-4)
        np.testing.assert_allclose(loc, ref_l, atol=1e-4)
    # A difference above --tolerance fails the run (the file just written is checked again).
    import onnx
    monkeypatch.setattr(export_script, 'export', lambda *args: onnx.load(str(out)))
    with pytest.raises(SystemExit, match='differs from PyTorch'):
        export_script.main(export_script.parse_args(['--model', str(world['exp']), '--output', str(out),
                                                     '--tolerance', '1e-12']))


def test_every_flag_states_its_default():
    for module in (extract_script, search_script, export_script):
        for action in module.build_parser()._actions:
            if action.dest != 'help':
                assert 'Default:' in (action.help or ''), (module.__name__, action.dest)


