"""Tests for users of the older PyTorch reproduction: its weights and checkpoints (built here in its exact layouts)
give the same features in our Model, no partial load passes silently, its experiment folders, combined
set, image numbering and command-line flags work or stop with one line naming our equivalent."""
import json
import os
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from aligned_reid import checkpoint, data, evaluation
from aligned_reid.checkpoint import CheckpointError, load_model
from aligned_reid.model import Model
from conftest import load_script, parse_error
from old_files import old_s26_array, old_state_dict, py2_dumps, randomized_old_model, write_py2_torch_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

train_script = load_script('script', 'train')
test_script = load_script('script', 'test')
ml_script = load_script('script', 'train_ml')


def old_features(model, x):
    with torch.no_grad():
        g, l, _ = model(x)
    return g, l


def close(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def adam_state(model):
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, weight_decay=5e-4)
    return opt.state_dict()


def write_layout(path, layout, models):
    """Writes `models` (OldModels) as the older code (or a later re-save) did; returns the model_index
    that names the last model."""
    if layout == 'weights_py2':        # published model_weight.pth: torch 0.3, Python 2, GPU storages
        write_py2_torch_file(path, old_state_dict(models[0]))
    elif layout == 'ckpt_py2':         # its ckpt.pth: dict(state_dicts=[model, optimizer], ep, scores)
        write_py2_torch_file(path, {'state_dicts': [old_state_dict(models[0]), adam_state(models[0])],
                                    'ep': 41, 'scores': 0.8}, v2=True)
    elif layout == 'ml_py2':           # train_ml.py: [model1, model2, optim1, optim2]
        write_py2_torch_file(path, {'state_dicts': [old_state_dict(m) for m in models]
                                    + [adam_state(m) for m in models], 'ep': 3, 'scores': None})
    elif layout == 'resaved_zip':      # re-saved under torch >= 0.4.1: num_batches_tracked, DataParallel prefix
        torch.save(OrderedDict(('module.' + k, v) for k, v in models[0].state_dict().items()), path)
    return len(models) if layout == 'ml_py2' else 1


@pytest.mark.parametrize('layout', ['weights_py2', 'ckpt_py2', 'ml_py2', 'resaved_zip'])
def test_old_weights_give_the_old_features(tmp_path, layout):
    models = [randomized_old_model(seed=s) for s in (0, 1)]
    path = tmp_path / 'model_weight.pth'
    index = write_layout(path, layout, models)
    reference = models[index - 1]
    model, cfg = load_model(path, device='cpu', model_index=index)
    assert not model.training and model.classifier is None
    assert cfg['base_model'] == 'resnet18' and cfg['local_conv_out_channels'] == 16 and cfg['last_stride'] == 2
    assert cfg['mean'] == list(checkpoint.OLD_MEAN) and cfg['std'] == list(checkpoint.OLD_STD)
    assert 'older reproduction' in cfg['layout'] and cfg['size_from_checkpoint'] is False
    torch.manual_seed(5)
    x = torch.randn(3, 3, 96, 48)
    g_old, l_old = old_features(reference, x)
    with torch.no_grad():
        out = model(x)
    assert close(out['global'], g_old) and close(out['local'], l_old)
    # The test can fail: without the folded bias the local features are clearly wrong.
    naive = Model('resnet18', local_conv_out_channels=16).eval()
    sd = {k: v for k, v in reference.state_dict().items() if k != 'local_conv.bias' and not k.startswith('fc.')}
    naive.load_state_dict(sd)
    with torch.no_grad():
        assert (naive(x)['local'] - l_old).abs().max() > 1e-2


def test_bias_fold_is_exact_algebra():
    # BN(y + b) with running mean m equals BN(y) with running mean m - b, brute force in float64.
    torch.manual_seed(0)
    y = torch.randn(4, 6, 5, 1, dtype=torch.float64)
    b, m = torch.randn(6, dtype=torch.float64) * 3, torch.randn(6, dtype=torch.float64)
    v, w, beta = torch.rand(6, dtype=torch.float64) + .5, torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    state = {'local_conv.bias': b, 'local_bn.running_mean': m, 'local_conv.weight': torch.zeros(6, 2, 1, 1)}
    converted, notes = checkpoint.convert_state(state)
    assert 'local_conv.bias' not in converted and any('folded' in n for n in notes)
    expected = (y + b[:, None, None] - m[:, None, None]) / torch.sqrt(v[:, None, None] + 1e-5) * w[:, None, None] \
        + beta[:, None, None]
    got = F.batch_norm(y, converted['local_bn.running_mean'], v, w, beta, training=False, eps=1e-5)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    # in training mode the batch mean absorbs the bias: the output does not depend on it
    t1 = F.batch_norm(y + b[:, None, None], None, None, w, beta, training=True)
    t2 = F.batch_norm(y, None, None, w, beta, training=True)
    assert torch.allclose(t1, t2, rtol=1e-10, atol=1e-10)


def test_no_silent_partial_load(tmp_path):
    old = randomized_old_model()
    sd = old_state_dict(old)
    cases = {
        'missing': ({k: v for k, v in sd.items() if k != 'local_bn.weight'}, ['needs keys the file lacks: local_bn.weight']),
        'unexpected': (dict(sd, **{'extra.proj.weight': torch.zeros(2)}), ['does not use: extra.proj.weight']),
        'no_local_bn_stats': ({k: v for k, v in sd.items() if k != 'local_bn.running_mean'},
                              ['local_bn.running_mean', 'local_conv.bias']),
    }
    for name, (state, expected) in cases.items():
        path = tmp_path / (name + '.pth')
        torch.save(state, path)
        with pytest.raises(CheckpointError) as err:
            load_model(path)
        msg = str(err.value)
        assert str(path) in msg and "older reproduction's model weights" in msg, name
        assert all(e in msg for e in expected), (name, msg)
        assert 'To fix: ' in msg and ('incomplete' in msg or 'another network' in msg)  # what would fix it
    path = tmp_path / 'ckpt.pth'
    write_py2_torch_file(path, {'state_dicts': [sd, sd, adam_state(old), adam_state(old)], 'ep': 1, 'scores': 0})
    with pytest.raises(CheckpointError, match=r'holds 2 model\(s\); --model_index 3 is out of range'):
        load_model(path, model_index=3)
    with pytest.raises(CheckpointError, match='--base_model resnet50 does not fit the weights, which are base_model resnet18'):
        load_model(path, overrides={'base_model': 'resnet50'})
    torch.save([1, 2, 3], tmp_path / 'list.pth')
    with pytest.raises(CheckpointError, match='not a model checkpoint: a list of 3 items'):
        load_model(tmp_path / 'list.pth')


def test_our_layouts_and_overrides(tmp_path):
    torch.manual_seed(0)
    model = Model('resnet18', last_stride=1, local_conv_out_channels=8, num_classes=4)
    args = {'base_model': 'resnet18', 'last_stride': 1, 'local_conv_out_channels': 8, 'resize_h_w': [64, 32],
            'normalize_feature': True, 'mean': list(data.IMAGENET_MEAN), 'std': list(data.IMAGENET_STD)}
    torch.save({'model': model.state_dict(), 'args': args, 'epoch': 2}, tmp_path / 'ckpt.pth')
    loaded, cfg = load_model(tmp_path / 'ckpt.pth')
    assert cfg['layout'] == 'train.py checkpoint (epoch 2)' and cfg['size_from_checkpoint']
    assert cfg['resize_h_w'] == [64, 32] and cfg['last_stride'] == 1 and cfg['normalize_feature'] is True
    assert cfg['mean'] == list(data.IMAGENET_MEAN)
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x)['local'], model.eval()(x)['local'])
    torch.save(model.state_dict(), tmp_path / 'plain.pth')
    _, cfg = load_model(tmp_path / 'plain.pth', overrides={'last_stride': 1, 'resize_h_w': None})
    assert cfg['layout'] == 'plain state dict' and not cfg['size_from_checkpoint'] and cfg['resize_h_w'] == [256, 128]
    _, cfg = load_model(tmp_path / 'plain.pth', overrides={'resize_h_w': [128, 64]})
    assert cfg['size_from_checkpoint'] and cfg['resize_h_w'] == [128, 64]


def test_old_files_as_pretrained_backbone(tmp_path):
    old = randomized_old_model()
    path = tmp_path / 'ckpt.pth'
    write_py2_torch_file(path, {'state_dicts': [old_state_dict(old), adam_state(old)], 'ep': 5, 'scores': 0})
    model = checkpoint.load_backbone(Model('resnet18'), str(path))
    for k, v in old.base.state_dict().items():
        if not k.endswith('num_batches_tracked'):
            assert torch.equal(model.base.state_dict()[k], v), k


# ----------------------------------------------------------------------------- folders and scripts


COMMON = ['--device', 'cpu', '--workers', '0', '--resize_h_w', '(64,32)']


def folder_listing(folder):
    return sorted(os.listdir(folder))


def test_test_script_on_published_weights(market_with_raw, tmp_path):
    old = randomized_old_model(seed=3)
    weights = tmp_path / 'model_weight.pth'
    write_py2_torch_file(weights, old_state_dict(old))
    args = test_script.parse_args(['--model_weight_file', str(weights), '--test_partitons',
                                   market_with_raw['partitions'], '--exp_dir', str(tmp_path / 'exp'),
                                   '--to_re_rank', 'false'] + COMMON)
    results = test_script.main(args)
    # The features test.py evaluated are the old model's on the old preprocessing (mean 0.486 ...).
    parts = data.read_partitions(market_with_raw['partitions'])
    im_dir = data.partitions_images_dir(market_with_raw['partitions'])
    model, cfg = test_script.load_model(args, torch.device('cpu'))
    feats, again, _ = test_script.evaluate(model, parts, im_dir, cfg, args, torch.device('cpu'))
    assert again['global']['mAP'] == results['global']['mAP']

    def old_on(mean, std):
        names, marks = evaluation.test_images(parts, 'test')   # test.py leaves out the unused mark-2 images
        ds = data.TestSet(im_dir, names, marks, data.build_transform((64, 32), mean=mean, std=std))
        return old_features(old, torch.stack([ds[i][0] for i in range(len(ds))]))

    g, l = old_on(checkpoint.OLD_MEAN, checkpoint.OLD_STD)
    assert close(torch.from_numpy(feats['global']), g) and close(torch.from_numpy(feats['local']), l)
    g_imagenet, _ = old_on(data.IMAGENET_MEAN, data.IMAGENET_STD)
    assert not close(torch.from_numpy(feats['global']), g_imagenet)  # the normalisation matters
    log = open(tmp_path / 'exp' / 'test.log').read()
    assert "older reproduction's model weights" in log and '0.486' in log


def test_old_experiment_folder_onlytest_and_resume(market_with_raw, tmp_path, capsys):
    old = randomized_old_model(seed=2)
    exp = tmp_path / 'old_run'
    exp.mkdir()
    write_py2_torch_file(exp / 'ckpt.pth', {'state_dicts': [old_state_dict(old), adam_state(old)], 'ep': 150,
                                             'scores': 0.7})
    base = ['--train_partitons', market_with_raw['partitions'], '--exp_dir', str(exp), '--ids_per_batch', '4'] + COMMON
    err = parse_error(train_script, base + ['--resume', 'true'], capsys)
    assert "the older reproduction's ckpt.pth" in err and '--model_weight_file' in err and '--onlytest true' in err
    assert folder_listing(exp) == ['ckpt.pth']
    args = train_script.parse_args(base + ['--only_test', 'true', '--to_re_rank', 'false'])
    assert args.base_model == 'resnet18' and args.local_conv_out_channels == 16 and args.mean == list(checkpoint.OLD_MEAN)
    train_script.main(args)
    assert 'global' in json.load(open(exp / 'metrics.json'))['results']
    assert 'older reproduction' in open(exp / 'train.log').read()


def test_foreign_checkpoint_writes_nothing(market_with_raw, tmp_path, capsys):
    exp = tmp_path / 'foreign'
    exp.mkdir()
    (exp / 'ckpt.pth').write_bytes(b'\xff\xd8\xff\xe0' + bytes(200))
    base = ['--train_partitons', market_with_raw['partitions'], '--exp_dir', str(exp), '--ids_per_batch', '4'] + COMMON
    for flag in ('--resume', '--onlytest'):
        err = parse_error(train_script, base + [flag, 'true'], capsys)
        assert 'ckpt.pth: not a torch file: looks like a JPEG image' in err and flag in err
        assert folder_listing(exp) == ['ckpt.pth']
    (exp / 'ckpt.pth').write_bytes(b'')
    assert 'empty file' in parse_error(train_script, base + ['--onlytest', 'true'], capsys)
    with pytest.raises(ValueError, match='empty file'):
        test_script.main(test_script.parse_args(['--exp_dir', str(exp), '--test_partitons',
                                                 market_with_raw['partitions']] + COMMON))
    assert folder_listing(exp) == ['ckpt.pth']


def _our_checkpoint(exp, market_with_raw, **arch):
    """A train.py checkpoint of a resnet18 run, as train.py writes it (arguments and RNG inside)."""
    argv = ['--train_partitons', market_with_raw['partitions'], '--exp_dir', str(exp), '--ids_per_batch', '4',
            '--base_model', 'resnet18', '--pretrained', 'false'] + COMMON
    args = train_script.parse_args(argv)
    model = Model('resnet18')
    opt = torch.optim.Adam(model.parameters())
    exp.mkdir(exist_ok=True)
    torch.save({'model': model.state_dict(), 'optimizer': opt.state_dict(), 'scaler': None, 'epoch': 1,
                'step_in_epoch': 0, 'best_metric': None, 'args': vars(args), 'rng': [], 'world_size': 1},
               exp / 'ckpt.pth')
    return model


def test_stray_args_json_is_not_trusted_and_architecture_clash_is_one_line(market_with_raw, tmp_path, capsys):
    exp = tmp_path / 'ours'
    _our_checkpoint(exp, market_with_raw)
    # a failed run left an args.json saying resnet50: the checkpoint's own arguments win
    (exp / 'args.json').write_text(json.dumps({'base_model': 'resnet50', 'local_conv_out_channels': 64}))
    args = train_script.parse_args(['--exp_dir', str(exp), '--onlytest', 'true', '--device', 'cpu'])
    assert args.base_model == 'resnet18' and args.local_conv_out_channels == 128
    err = parse_error(train_script, ['--exp_dir', str(exp), '--resume', 'true', '--base_model', 'resnet34'], capsys)
    assert '--base_model resnet34' in err and 'holds a model with base_model resnet18' in err
    last = err.strip().splitlines()[-1]  # argparse's usage, then one line
    assert 'Traceback' not in err and err.count('error:') == 1 and 'error: --base_model resnet34' in last


def test_start_training_from_old_weights(market_with_raw, tmp_path):
    old = randomized_old_model(seed=6)
    weights = tmp_path / 'model_weight.pth'
    write_py2_torch_file(weights, old_state_dict(old))
    exp = tmp_path / 'finetune'
    args = train_script.parse_args(['--train_partitons', market_with_raw['partitions'], '--exp_dir', str(exp),
                                    '--model_weight_file', str(weights), '--ids_per_batch', '4', '--ims_per_id', '2',
                                    '--total_epochs', '1', '-idlw', '1', '--final_test', 'false'] + COMMON)
    assert args.base_model == 'resnet18' and args.local_conv_out_channels == 16
    train_script.main(args)
    log = open(exp / 'train.log').read()
    assert "weights from {} (the older reproduction's model weights".format(weights) in log
    assert 'local_conv.bias folded' in log and 'ID classifier initialised anew (5 classes in the file, 8 here)' in log
    state = checkpoint.load_file(exp / 'ckpt.pth')
    assert state['args']['model_weight_file'] == str(weights)


def test_train_ml_tests_both_models_of_an_old_mutual_learning_checkpoint(market_with_raw, tmp_path):
    models = [randomized_old_model(seed=s) for s in (7, 8)]
    exp = tmp_path / 'old_ml'
    exp.mkdir()
    write_layout(exp / 'ckpt.pth', 'ml_py2', models)
    args = ml_script.parse_args(['--train_partitons', market_with_raw['partitions'], '--exp_dir', str(exp),
                                 '--ids_per_batch', '4', '--onlytest', 'true', '--to_re_rank', 'false'] + COMMON)
    ml_script.main(args)
    metrics = json.load(open(exp / 'metrics.json'))
    assert metrics['results']['global']['mAP'] != metrics['results_model2']['global']['mAP']
    log = open(exp / 'train.log').read()
    assert 'mutual learning, 2 models + 2 optimizers; model 1' in log and '; model 2;' in log


# ----------------------------------------------------------------------------- flags

def test_old_flags(market_with_raw, tmp_path, capsys):
    base = ['--train_partitons', market_with_raw['partitions'], '--exp_dir', str(tmp_path / 'x'),
            '--ids_per_batch', '4']
    args = train_script.parse_args(base + ['--dataset', 'market1501', '--resize_h_w', '(256,128)', '--g_loss_weight', '0.5',
                                           '--l_loss_weight', '2', '--set_seed', 'true', '--log_to_file', 'true',
                                           '--staircase_decay_at_epochs', '(101,201,)', '--only_test', 'false'])
    assert args.resize_h_w == [256, 128] and args.global_loss_weight == 0.5 and args.local_loss_weight == 2
    assert args.staircase_decay_at_epochs == [101, 201] and args.seed == 1 and args.train_dataset == 'market1501'
    assert train_script.parse_args(base + ['--resize_h_w', '256', '128']).resize_h_w == [256, 128]
    assert '--resize_h_w takes a height and a width' in parse_error(train_script, base + ['--resize_h_w', '256'], capsys)
    for module in (train_script, test_script, ml_script):
        err = parse_error(module, base + ['-d', '(0,)'], capsys)
        assert '-d is a flag of the older reproduction' in err and 'CUDA_VISIBLE_DEVICES' in err and 'torchrun' in err
        err = parse_error(module, base + ['-r', '1'], capsys)
        assert '-r is a flag of the older reproduction' in err and '--exp_dir' in err
    ml = ml_script.parse_args(base + ['--pm_loss_weight', '1', '-idlw', '1', '--gdm_loss_weight', '0.5',
                                      '--num_models', '2'])
    assert ml.prob_mutual_loss_weight == 1 and ml.global_dist_mutual_loss_weight == 0.5
    assert '--num_models 3: train_ml.py trains 2 models' in parse_error(ml_script, base + ['--num_models', '3'], capsys)
    t = test_script.parse_args(['--model_weight_file', __file__, '--test_partitons', market_with_raw['partitions'],
                                '--resize_h_w', '(64,32)', '--dataset', 'duke', '--test_dataset', 'market1501'])
    assert t.resize_h_w == [64, 32] and t.train_dataset == 'duke'


# ----------------------------------------------------------------------------- the older code's folders

def test_combined_set_in_trainval_images_trains(market_with_raw, tmp_path):
    # The older combine script's folder: trainval_images/ beside a Python 2 partitions.pkl with
    # trainval keys only (names as numpy |S26 arrays).
    folder = tmp_path / 'combined'
    (folder / 'trainval_images').mkdir(parents=True)
    parts = data.read_partitions(market_with_raw['partitions'])
    src = data.partitions_images_dir(market_with_raw['partitions'])
    for n in parts['trainval_im_names']:
        os.link(os.path.join(src, n), folder / 'trainval_images' / n)
    (folder / 'partitions.pkl').write_bytes(py2_dumps({
        b'trainval_im_names': old_s26_array(parts['trainval_im_names']),
        b'trainval_ids2labels': parts['trainval_ids2labels']}))
    assert data.partitions_images_dir(folder / 'partitions.pkl') == str(folder / 'trainval_images')
    exp = tmp_path / 'exp'
    args = train_script.parse_args(['--train_partitons', str(folder / 'partitions.pkl'), '--train_dataset', 'combined',
                                    '--exp_dir', str(exp), '--ids_per_batch', '4', '--ims_per_id', '2',
                                    '--total_epochs', '1', '--base_model', 'resnet18', '--pretrained', 'false'] + COMMON)
    train_script.main(args)
    assert checkpoint.load_file(exp / 'ckpt.pth')['epoch'] == 1
    (folder / 'images').mkdir()
    assert data.partitions_images_dir(folder / 'partitions.pkl') == str(folder / 'images')


def test_image_numbering_follows_the_older_code(market_with_raw, tmp_path):
    """The older code renamed sorted bounding_box_train, then bounding_box_test (junk dropped), query, then
    gt_bbox of the query (id, camera) pairs, counting k per (id, camera) over that sequence. Same names must
    point at the same raw images here."""
    raw = market_with_raw['raw']
    root = next(p for p in raw.rglob('bounding_box_train')).parent

    def pid_cam(name):
        pid = -1 if name.startswith('-1') else int(name[:4])
        return pid, int(name[4] if name.startswith('-1') else name[6])

    listing = {sub: sorted(os.listdir(root / sub)) for sub in ('bounding_box_train', 'bounding_box_test', 'query', 'gt_bbox')
               if (root / sub).is_dir()}
    listing['bounding_box_test'] = [n for n in listing['bounding_box_test'] if not n.startswith('-1')]
    q_pairs = {pid_cam(n) for n in listing['query']}
    listing['gt_bbox'] = [n for n in listing.get('gt_bbox', []) if pid_cam(n) in q_pairs]
    count, expected = {}, {}
    for sub in ('bounding_box_train', 'bounding_box_test', 'query', 'gt_bbox'):
        for n in listing[sub]:
            if not n.endswith('.jpg'):
                continue
            key = pid_cam(n)
            expected['{:08d}_{:04d}_{:08d}.jpg'.format(key[0], key[1], count.get(key, 0))] = (root / sub / n).read_bytes()
            count[key] = count.get(key, 0) + 1
    images = market_with_raw['root'] / 'market1501' / 'images'
    got = {n: (images / n).read_bytes() for n in os.listdir(images)}
    assert set(got) == set(expected)
    assert all(got[n] == expected[n] for n in expected)
    assert data.read_partitions(market_with_raw['partitions'])['format_version'] == data.FORMAT_VERSION == 2
