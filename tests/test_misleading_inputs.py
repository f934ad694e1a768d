"""Inputs that used to give a wrong result, a traceback or a silent success: a test at other settings than the
model's (test.py, train.py --onlytest, search.py), a full disk before the work starts, a run with no readable
image, ranked-list pictures that do not say their distance, a resumed run given another partitions file."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from aligned_reid import checkpoint, cli, visualize
from aligned_reid.model import Model
from aligned_reid.prepare import prepare_market_layout
from aligned_reid.synthetic import render_market_tree
from conftest import load_script

train_script = load_script('script', 'train')
test_script = load_script('script', 'test')
extract_script = load_script('script', 'extract')
search_script = load_script('script', 'search')
CPU = ['--device', 'cpu', '--workers', '0']


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A tiny prepared set and a train.py experiment folder at 64 x 32 as a one-epoch run leaves it (the weights
    are untrained: these tests are about which settings are used and what is written), with the run's
    metrics.json."""
    root = tmp_path_factory.mktemp('misleading')
    render_market_tree(str(root / 'raw'), num_train_ids=8, num_test_ids=5, ims_per_id_cam=2, num_cams=3,
                       im_size=(64, 32), seed=2)
    prepare_market_layout(str(root / 'raw'), str(root / 'synthetic'), dataset='synthetic', num_val_ids=2,
                          verbose=False)
    partitions = str(root / 'synthetic' / 'partitions.pkl')
    exp = root / 'run'
    args = train_script.parse_args(['--train_partitons', partitions, '--exp_dir', str(exp), '--base_model', 'resnet18',
                                    '--pretrained', 'false', '--resize_h_w', '64', '32', '--ids_per_batch', '2',
                                    '--ims_per_id', '2', '--total_epochs', '1'] + CPU)
    torch.manual_seed(0)
    model = Model('resnet18', pretrained=False)
    optimizer = torch.optim.Adam(model.parameters())
    checkpoint.save_checkpoint(checkpoint.training_state(
        [model], [optimizer], [None], 1, 0, None, checkpoint.run_arguments(args), [checkpoint.get_rng_state()], 1),
        checkpoint.path_in(str(exp)))
    (exp / 'metrics.json').write_text('{"the run": "its own metrics"}')
    return {'root': root, 'partitions': partitions, 'exp': exp, 'ckpt': str(exp / 'ckpt.pth')}


def _parse_error(module, argv, capsys):
    with pytest.raises(SystemExit) as e:
        module.parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------------------- other settings than the model's

def test_test_at_other_settings_is_refused_then_kept_apart(run, capsys):
    """test.py --resize_h_w 32 16 on a 64 x 32 model stops with one line; with --allow_other_settings true it
    tests, warns, and writes metrics_32x16.json and ranks_synthetic_32x16/, never the run's metrics.json."""
    base = ['--exp_dir', str(run['exp']), '--to_re_rank', 'false'] + CPU
    err = _parse_error(test_script, base + ['--resize_h_w', '32', '16'], capsys)
    assert '--resize_h_w 32 16: {} was trained with --resize_h_w 64 32'.format(run['ckpt']) in err
    assert '--allow_other_settings true' in err and 'metrics_32x16.json' in err
    err = _parse_error(test_script, base + ['--normalize_feature', 'true'], capsys)
    assert '--normalize_feature true: {} was trained with --normalize_feature false'.format(run['ckpt']) in err
    assert test_script.parse_args(base + ['--resize_h_w', '64', '32']).other_settings == {}  # the model's own

    args = test_script.parse_args(base + ['--resize_h_w', '32', '16', '--allow_other_settings', 'true',
                                          '--num_vis_queries', '1', '--test_distance', 'global'])
    test_script.main(args)
    out = capsys.readouterr().out
    assert 'warning: testing with --resize_h_w 32 16, not the --resize_h_w 64 32' in out
    assert json.load(open(run['exp'] / 'metrics.json')) == {'the run': 'its own metrics'}
    record = json.load(open(run['exp'] / 'metrics_32x16.json'))
    assert record['resize_h_w'] == [32, 16] and 'global' in record['results']
    assert sorted(os.listdir(run['exp'] / 'ranks_synthetic_32x16')) == ['cmc.png', 'query_00000.png']


def test_train_onlytest_at_other_settings_is_refused(run, capsys):
    err = _parse_error(train_script, ['--exp_dir', str(run['exp']), '--onlytest', 'true', '--resize_h_w', '32', '16']
                       + CPU, capsys)
    assert "--resize_h_w 32 16: {} was trained with --resize_h_w 64 32, and --onlytest writes the run's " \
           'metrics.json'.format(run['ckpt']) in err and 'script/test.py --allow_other_settings true' in err


def test_search_refuses_features_of_two_input_sizes(run, tmp_path):
    images = tmp_path / 'images'
    images.mkdir()
    im_dir = os.path.join(os.path.dirname(run['partitions']), 'images')
    for name in sorted(os.listdir(im_dir))[:3]:
        shutil.copy(os.path.join(im_dir, name), images / name)
    common = ['--model', run['ckpt'], '--images', str(images), '--progress', 'false'] + CPU
    extract_script.main(extract_script.parse_args(common + ['--output', str(tmp_path / 'q.h5'),
                                                            '--resize_h_w', '32', '16']))
    extract_script.main(extract_script.parse_args(common + ['--output', str(tmp_path / 'g.h5')]))
    argv = ['--query', str(tmp_path / 'q.h5'), '--gallery', str(tmp_path / 'g.h5'), '--output',
            str(tmp_path / 'out.csv'), '--device', 'cpu']
    with pytest.raises(ValueError, match='query features are of 32 x 16 inputs, gallery features of 64 x 32'):
        search_script.main(search_script.parse_args(argv))
    assert not (tmp_path / 'out.csv').exists()
    search_script.main(search_script.parse_args(argv + ['--allow_other_settings', 'true']))
    assert (tmp_path / 'out.csv').exists()


# ----------------------------------------------------------------------------- a full disk

@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full')
def test_a_full_disk_before_training_is_one_line(run, tmp_path):
    """args.json on a full disk (its temporary is made to land on /dev/full): one line naming the file."""
    exp = tmp_path / 'full'
    exp.mkdir()
    os.symlink('/dev/full', exp / 'args.json.tmp.{}'.format(os.getpid()))
    args = train_script.parse_args(['--train_partitons', run['partitions'], '--exp_dir', str(exp), '--base_model',
                                    'resnet18', '--pretrained', 'false', '--ids_per_batch', '2', '--ims_per_id', '2']
                                   + CPU)
    try:
        with pytest.raises(SystemExit) as e:
            cli.run_cli(train_script.main, lambda: args, 'train.py', log_to_file=True)
    finally:
        cli.setup_logging(None)  # later tests log to no file of this one
    assert e.value.code == 'train.py: cannot write {}: No space left on device'.format(exp / 'args.json')
    assert not (exp / 'ckpt.pth').exists() and not (exp / 'args.json').exists()


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full')
def test_a_log_on_a_full_disk_stops_with_one_line(run, tmp_path, capsys):
    """test.py's log on a full disk: one line naming it and nothing tested or written, not a '--- Logging
    error ---' block after every line."""
    out = tmp_path / 'out'
    out.mkdir()
    os.symlink('/dev/full', out / 'test.log')
    args = test_script.parse_args(['--model_weight_file', run['ckpt'], '--exp_dir', str(out), '--to_re_rank',
                                   'false'] + CPU)
    try:
        with pytest.raises(SystemExit) as e:
            cli.run_cli(test_script.main, lambda: args, 'test.py', errors=(ValueError, FileNotFoundError))
    finally:
        cli.setup_logging(None)  # later tests log to no file of this one
    assert e.value.code == 'test.py: cannot write {}: No space left on device'.format(out / 'test.log')
    assert 'Logging error' not in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ['test.log']


# ----------------------------------------------------------------------------- no usable image

def test_extraction_with_no_readable_image_is_refused(run, tmp_path):
    inputs = tmp_path / 'notes'
    inputs.mkdir()
    (inputs / 'a.jpg').write_text('not an image')
    (inputs / 'b.txt').write_text('nor this')
    output = tmp_path / 'f.h5'
    args = extract_script.parse_args(['--model', run['ckpt'], '--images', str(inputs), '--output', str(output),
                                      '--progress', 'false'] + CPU)
    with pytest.raises(ValueError, match=r'none of the 2 inputs of {} is a readable image \(the first: {}'.format(
            inputs, inputs / 'a.jpg')):
        extract_script.main(args)
    assert not output.exists()


# ----------------------------------------------------------------------------- pictures

def test_ranked_list_pictures_name_their_distance(tmp_path):
    """A line below the grid says which distance ranks it (drawn here independently with the same font); the
    grid above it is the one drawn without it."""
    q = [Image.new('RGB', (16, 32), (200, 0, 0))]
    g = [Image.new('RGB', (16, 32), (0, 0, 200 - 40 * i)) for i in range(3)]
    dist = np.array([[0.3, 0.1, 0.2]])
    kw = dict(top_k=3, size=(32, 64))
    plain = visualize.save_ranked_lists(dist, None, None, None, None, q, g, tmp_path / 'a', **kw)
    named = visualize.save_ranked_lists(dist, None, None, None, None, q, g, tmp_path / 'b', distance='local, re-ranked',
                                        **kw)
    a, b = np.asarray(Image.open(plain[0]).convert('RGB')), np.asarray(Image.open(named[0]).convert('RGB'))
    assert b.shape == (a.shape[0] + 16, a.shape[1], 3)
    line = Image.new('RGB', (a.shape[1], 16), 'white')
    ImageDraw.Draw(line).text((2, 2), 'distance: local, re-ranked', fill='black', font=ImageFont.load_default())
    assert (b[-16:] == np.asarray(line)).all()
    assert (b[:-16] == a).all()


# ----------------------------------------------------------------------------- resuming on another file

def test_resume_on_another_partitions_file_is_refused(run, tmp_path, capsys):
    other = tmp_path / 'copy' / 'partitions.pkl'
    other.parent.mkdir()
    shutil.copy(run['partitions'], other)
    argv = ['--exp_dir', str(run['exp']), '--resume', 'true'] + CPU
    err = _parse_error(train_script, argv + ['--train_partitons', str(other)], capsys)
    assert '--train_partitons {}: the run in {} was trained on {}'.format(other, run['exp'], run['partitions']) in err
    link = tmp_path / 'link'
    link.symlink_to(os.path.dirname(run['partitions']))
    args = train_script.parse_args(argv + ['--train_partitons', str(link / 'partitions.pkl')])  # the same file
    assert args.resume and args.train_dataset == 'synthetic'
