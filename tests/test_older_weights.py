"""Training from the older reproduction's files (built in its exact layouts by tests/old_files.py): its
'fc.*' classifier is dropped or kept as the flags say, train_ml.py starts from its two-model ckpt.pth,
the weights' normalisation is kept unless --mean / --std are given, and weights or a --pretrained_path
that do not fit the model the flags describe are refused by the flag checks, before anything is written."""
import json
import os
import re
import sys

import pytest
import torch

from aligned_reid import checkpoint, cli, data, engine
from aligned_reid.model import Model
from aligned_reid.prepare import prepare_market_layout
from aligned_reid.synthetic import render_market_tree
from old_files import old_state_dict, randomized_old_model, write_py2_torch_file
from conftest import REPO, load_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")

train_script = load_script('script', 'train')
sys.path.insert(0, str(REPO / 'script'))
try:
    ml_script = load_script('script', 'train_ml')
finally:
    sys.path.remove(str(REPO / 'script'))

NUM_IDS = 8  # training identities of the set below
COMMON = ['--device', 'cpu', '--workers', '0', '--resize_h_w', '64', '32', '--ids_per_batch', '4',
          '--ims_per_id', '2']
# One epoch that leaves every weight as it was (Adam's step, weight decay included, scales with the
# rate), so the saved checkpoint shows what was loaded; BN running statistics still move.
NO_STEP = ['--total_epochs', '1', '--base_lr', '0', '--final_test', 'false']


@pytest.fixture(scope='module')
def market(tmp_path_factory):
    root = tmp_path_factory.mktemp('older_weights')
    render_market_tree(str(root / 'raw'), num_train_ids=NUM_IDS, num_test_ids=4, ims_per_id_cam=2, num_cams=2,
                       im_size=(64, 32), seed=3)
    prepare_market_layout(str(root / 'raw'), str(root / 'market1501'), num_val_ids=2, verbose=False)
    return str(root / 'market1501' / 'partitions.pkl')


def adam_state(model):
    return torch.optim.Adam(model.parameters(), lr=2e-4).state_dict()


def write_old_ckpt(path, models):
    """The older reproduction's ckpt.pth: state_dicts=[model(s)..., optimizer(s)...], ep, scores (Python 2)."""
    write_py2_torch_file(path, {'state_dicts': [old_state_dict(m) for m in models] + [adam_state(m) for m in models],
                                'ep': 150, 'scores': 0.7})


def parse_error(module, argv, capsys):
    with pytest.raises(SystemExit) as e:
        module.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err and err.count('error:') == 1
    return err.strip().splitlines()[-1]  # argparse's usage, then one line


def same(saved, old, keys=('base.conv1.weight', 'base.layer4.1.conv2.weight', 'local_conv.weight')):
    return all(torch.equal(saved[k], old.state_dict()[k]) for k in keys)


def run_log(exp):
    return open(os.path.join(exp, 'train.log')).read()


# ----------------------------------------------------------------------------- item 2: its classifier

def test_finetune_from_old_ckpt_with_the_default_flags(market, tmp_path, capsys):
    # The README's command (default -idlw 0) on a file that carries its 'fc.*' classifier, as every file of
    # that code base does; reached through the command the --resume refusal recommends.
    old = randomized_old_model(seed=1, local_conv_out_channels=16, num_classes=5)
    old_exp = tmp_path / 'old_run'
    old_exp.mkdir()
    write_old_ckpt(old_exp / 'ckpt.pth', [old])
    err = parse_error(train_script, ['--train_partitons', market, '--exp_dir', str(old_exp), '--resume', 'true']
                      + COMMON, capsys)
    recommended = re.search(r'--model_weight_file (\S+) --exp_dir NEW_FOLDER', err)
    assert recommended and recommended.group(1) == str(old_exp / 'ckpt.pth')
    new_exp = tmp_path / 'from_old'
    args = train_script.parse_args(['--train_partitons', market, '--model_weight_file', recommended.group(1),
                                    '--exp_dir', str(new_exp), '-llw', '1'] + COMMON + NO_STEP)
    train_script.main(args)
    log = run_log(new_exp)
    assert 'ID classifier of the file (5 classes) dropped: the model has none' in log
    saved = checkpoint.load_file(new_exp / 'ckpt.pth')
    assert not any(k.startswith(('classifier.', 'fc.')) for k in saved['model'])
    assert same(saved['model'], old) and saved['args']['local_loss_weight'] == 1


def start_models(args, num_models, capsys):
    """The run's models built and loaded as main does (engine.build_model, engine.start_from_file), with a
    stdout logger and no folder written. Returns (models, what was logged)."""
    run = engine.Run(0, 1, torch.device('cpu'), cli.setup_logging(None), 'train.py')
    models = [engine.build_model(args, NUM_IDS, run) for _ in range(num_models)]
    optimizers = [torch.optim.Adam(m.parameters()) for m in models]
    engine.start_from_file(args, models, optimizers, [None] * num_models, run)
    return models, capsys.readouterr().out


def test_classifier_kept_when_the_id_loss_uses_it_and_the_class_count_fits(market, tmp_path, capsys):
    old = randomized_old_model(seed=2, local_conv_out_channels=16, num_classes=NUM_IDS)
    write_old_ckpt(tmp_path / 'ckpt.pth', [old])
    args = train_script.parse_args(['--train_partitons', market, '--model_weight_file', str(tmp_path / 'ckpt.pth'),
                                    '--exp_dir', str(tmp_path / 'exp'), '-idlw', '1'] + COMMON)
    (model,), log = start_models(args, 1, capsys)
    assert 'ID classifier of the file kept ({} classes)'.format(NUM_IDS) in log
    assert torch.equal(model.classifier.weight, old.fc.weight) and torch.equal(model.classifier.bias, old.fc.bias)
    assert not (tmp_path / 'exp').exists()


def test_train_ml_from_the_old_two_model_checkpoint(market, tmp_path):
    olds = [randomized_old_model(seed=s, local_conv_out_channels=16, num_classes=5) for s in (3, 4)]
    write_old_ckpt(tmp_path / 'ckpt.pth', olds)
    exp = tmp_path / 'from_old_ml'
    args = ml_script.parse_args(['--train_partitons', market, '--model_weight_file', str(tmp_path / 'ckpt.pth'),
                                 '--exp_dir', str(exp), '-gdmlw', '1'] + COMMON + NO_STEP)
    ml_script.main(args)
    saved = checkpoint.load_file(exp / 'ckpt.pth')
    # model i starts from its model i: two different models, as mutual learning needs
    assert same(saved['models'][0], olds[0]) and same(saved['models'][1], olds[1])
    log = run_log(exp)
    assert log.count('ID classifier of the file (5 classes) dropped') == 2
    assert '; model 1;' in log and '; model 2;' in log


def test_train_ml_model_index_starts_both_models_from_one(market, tmp_path, capsys):
    olds = [randomized_old_model(seed=s, local_conv_out_channels=16, num_classes=5) for s in (3, 4)]
    write_old_ckpt(tmp_path / 'ckpt.pth', olds)
    args = ml_script.parse_args(['--train_partitons', market, '--model_weight_file', str(tmp_path / 'ckpt.pth'),
                                 '--exp_dir', str(tmp_path / 'exp'), '--model_index', '2'] + COMMON)
    models, _ = start_models(args, 2, capsys)
    for m in models:
        assert same(m.state_dict(), olds[1])


# ----------------------------------------------------------------------------- refusals before anything is written

def test_weights_that_do_not_fit_are_refused_by_the_flag_checks(market, tmp_path, capsys):
    old = randomized_old_model(seed=5, local_conv_out_channels=16)
    sd = old_state_dict(old)
    sd['extra.proj.weight'] = torch.zeros(3)
    torch.save(sd, tmp_path / 'foreign.pth')
    exp = tmp_path / 'exp'
    line = parse_error(train_script, ['--train_partitons', market, '--model_weight_file', str(tmp_path / 'foreign.pth'),
                                      '--exp_dir', str(exp)] + COMMON, capsys)
    assert 'error: --model_weight_file' in line and 'extra.proj.weight' in line
    assert not re.search(r'classifier\.(weight|bias)', line)  # the file's classifier is not what is wrong
    assert not exp.exists()


def test_resumed_run_that_no_longer_fits_the_flags_writes_nothing(market, tmp_path, capsys):
    exp = tmp_path / 'ours'
    args = train_script.parse_args(['--train_partitons', market, '--exp_dir', str(exp), '--base_model', 'resnet18',
                                    '--pretrained', 'false'] + COMMON)
    model = Model('resnet18')
    exp.mkdir()
    torch.save(checkpoint.training_state([model], [torch.optim.Adam(model.parameters())], [None], 1, 0, None,
                                         checkpoint.run_arguments(args), [], 1), exp / 'ckpt.pth')
    # -idlw 1 asks for a classifier the checkpoint lacks
    line = parse_error(train_script, ['--exp_dir', str(exp), '--resume', 'true', '-idlw', '1'] + COMMON, capsys)
    assert 'error: --resume' in line and 'classifier.weight' in line
    assert sorted(os.listdir(exp)) == ['ckpt.pth']


def test_a_bad_pretrained_path_leaves_no_folder(market, tmp_path, capsys):
    base = ['--train_partitons', market, '--exp_dir', str(tmp_path / 'exp')] + COMMON
    jpeg = tmp_path / 'resnet50.pth'
    jpeg.write_bytes(b'\xff\xd8\xff\xe0' + bytes(200))
    line = parse_error(train_script, base + ['--pretrained_path', str(jpeg)], capsys)
    assert 'error: --pretrained_path: {}'.format(jpeg) in line and 'JPEG' in line
    torch.save(Model('resnet18').base.state_dict(), tmp_path / 'resnet18.pth')
    line = parse_error(train_script, base + ['--pretrained_path', str(tmp_path / 'resnet18.pth')], capsys)
    assert 'error: --pretrained_path' in line and 'does not fit the resnet50 backbone' in line
    line = parse_error(ml_script, base + ['--pretrained_path', str(tmp_path / 'resnet18.pth')], capsys)
    assert 'error: --pretrained_path' in line
    assert not (tmp_path / 'exp').exists()
    args = train_script.parse_args(base + ['--pretrained_path', str(tmp_path / 'resnet18.pth'), '--base_model',
                                           'resnet18'])
    assert args.pretrained_path == str(tmp_path / 'resnet18.pth') and not (tmp_path / 'exp').exists()


# ----------------------------------------------------------------------------- item 3: the normalisation

def test_normalisation_of_the_weights_is_kept_and_logged(market, tmp_path, capsys):
    old = randomized_old_model(seed=6, local_conv_out_channels=16)
    write_old_ckpt(tmp_path / 'ckpt.pth', [old])
    base = ['--train_partitons', market, '--exp_dir', str(tmp_path / 'exp')] + COMMON
    start = ['--model_weight_file', str(tmp_path / 'ckpt.pth')]
    args = train_script.parse_args(base + start)
    assert args.mean == list(checkpoint.OLD_MEAN) and args.std == list(checkpoint.OLD_STD)
    _, log = start_models(args, 1, capsys)
    assert re.search(r'input normalisation: mean \[0\.486, 0\.459, 0\.408\] std \[0\.229, 0\.224, 0\.225\] '
                     r'\(the weights\' own', log)
    given = train_script.parse_args(base + start + ['--mean', '0.5', '0.5', '0.5', '--std', '0.25', '0.25', '0.25'])
    assert given.mean == [0.5] * 3 and given.std == [0.25] * 3
    _, log = start_models(given, 1, capsys)
    assert 'input normalisation: mean [0.5, 0.5, 0.5] std [0.25, 0.25, 0.25] (--mean / --std' in log
    assert 'the weights were trained with mean [0.486, 0.459, 0.408]' in log
    fresh = train_script.parse_args(base + ['--pretrained', 'false'])
    assert fresh.mean == list(data.IMAGENET_MEAN) and fresh.std == list(data.IMAGENET_STD)
    assert train_script.parse_args(base + ['--std', '1', '1', '1']).mean == list(data.IMAGENET_MEAN)
    assert '--std must be positive' in parse_error(train_script, base + ['--std', '0', '1', '1'], capsys)


def test_normalisation_travels_with_the_run(market, tmp_path):
    old = randomized_old_model(seed=7, local_conv_out_channels=16)
    write_old_ckpt(tmp_path / 'ckpt.pth', [old])
    exp = tmp_path / 'exp'
    args = train_script.parse_args(['--train_partitons', market, '--exp_dir', str(exp), '--model_weight_file',
                                    str(tmp_path / 'ckpt.pth')] + COMMON + NO_STEP)
    train_script.main(args)
    assert json.load(open(exp / 'args.json'))['mean'] == list(checkpoint.OLD_MEAN)
    assert checkpoint.load_file(exp / 'ckpt.pth')['args']['std'] == list(checkpoint.OLD_STD)
    # resumed and tested with it, unless given again
    resumed = train_script.parse_args(['--exp_dir', str(exp), '--resume', 'true', '--device', 'cpu'])
    assert resumed.mean == list(checkpoint.OLD_MEAN)
    tested = train_script.parse_args(['--exp_dir', str(exp), '--onlytest', 'true', '--device', 'cpu', '--mean',
                                      '0.1', '0.2', '0.3'])
    assert tested.mean == [0.1, 0.2, 0.3] and tested.std == list(checkpoint.OLD_STD)
