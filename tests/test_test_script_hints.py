"""test.py and the training flags a user carries over from train.py (and the older reproduction's
commands): each stops with one line saying the flag belongs to train.py and what test.py uses instead,
not argparse's 'unrecognized arguments'; the original README's test commands still run as written."""
import shutil

import pytest
import torch

from aligned_reid.model import Model
from conftest import load_script

test_script = load_script('script', 'test')

HINTS = {  # flag (every spelling train.py accepts) -> what the line must name
    ('-glw', '--global_loss_weight', '--g_loss_weight'): '--test_distance',
    ('-llw', '--local_loss_weight', '--l_loss_weight'): '--test_distance',
    ('-idlw', '--id_loss_weight'): '--test_distance',
    ('-gm', '--global_margin', '-lm', '--local_margin'): '--test_distance',
    ('--set_seed',): 'no randomness',
    ('--log_to_file',): 'test.log',
}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp('hints')
    torch.save(Model('resnet18', local_conv_out_channels=8).state_dict(), folder / 'model.pth')
    (folder / 'partitions.pkl').write_bytes(b'')  # the flag checks only look for the file
    return folder


@pytest.mark.parametrize('flags,instead', list(HINTS.items()))
def test_training_flags_stop_with_a_hint(files, capsys, flags, instead):
    base = ['--model_weight_file', str(files / 'model.pth'), '--test_partitons', str(files / 'partitions.pkl'),
            '--device', 'cpu']
    for flag in flags:
        value = 'true' if flag in ('--set_seed', '--log_to_file') else '1'
        for argv in (base + [flag, value], [flag, value] + base):
            with pytest.raises(SystemExit) as e:
                test_script.parse_args(argv)
            assert e.value.code == 2
            err = capsys.readouterr().err
            line = err.strip().splitlines()[-1]
            assert 'unrecognized arguments' not in err and err.count('error:') == 1
            assert 'error: {} is a flag of training (train.py)'.format(flag) in line and instead in line, line


def test_original_readme_test_commands_run_as_written(files, monkeypatch):
    # python test.py --onlytest True --to_re_rank True --train_dataset market1501 --test_dataset market1501
    #     --test_partitons .../market1501/partitions.pkl   (and the cross-dataset one)
    monkeypatch.chdir(files)
    (files / 'exp' / 'train' / 'market1501').mkdir(parents=True)
    shutil.copy(files / 'model.pth', files / 'exp' / 'train' / 'market1501' / 'ckpt.pth')
    args = test_script.parse_args(['--onlytest', 'True', '--to_re_rank', 'True', '--train_dataset', 'market1501',
                                   '--test_dataset', 'market1501', '--test_partitons', str(files / 'partitions.pkl')])
    assert args.test_partitions == str(files / 'partitions.pkl') and args.to_re_rank
    args = test_script.parse_args(['--onlytest', 'True', '--to_re_rank', 'True', '--train_dataset', 'market1501',
                                   '--test_dataset', 'duke', '--test_dataset_partitions', str(files / 'partitions.pkl')])
    assert args.test_dataset == 'duke' and args.model_weight_file.endswith('ckpt.pth')
