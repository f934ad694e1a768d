"""The parsers of the scripts (aligned_reid.cli.ArgumentParser): flags are never abbreviated, a usage error is one
line, --workers fits the CPUs of the machine, a folder given as the partitions file is named as such, and a run
is named after the dataset its partitions file records."""
import ast
import os

import pytest

from aligned_reid import cli, data
from conftest import REPO, load_script, parse_error

train_script = load_script('script', 'train')
test_script = load_script('script', 'test')
# the programs (a helper module beside the benches, bench/re_ranking_numpy.py, has no parser)
SCRIPT_FILES = sorted(p for folder in ('script', 'data_set', 'bench') for p in (REPO / folder).glob('*.py')
                      if "__name__ == '__main__'" in p.read_text())


def _partitions(path, dataset=None):
    """A valid partitions file of 4 identities seen by 2 cameras (no images: the flag checks read the file only)."""
    names = [data.make_im_name(pid, cam, k) for pid in range(1, 5) for cam in (1, 2) for k in range(2)]
    part = {'trainval_im_names': names, 'trainval_ids2labels': {pid: pid - 1 for pid in range(1, 5)}}
    if dataset:
        part['dataset'] = dataset
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data.write_partitions(part, path)
    return path


def test_every_parser_is_built_by_the_shared_factory():
    """script/, data_set/ and bench/ build their parsers with cli.ArgumentParser only (no argparse.ArgumentParser);
    train.py and train_ml.py through aligned_reid.train_flags, which uses it too."""
    for path in SCRIPT_FILES + [REPO / 'aligned_reid' / 'train_flags.py']:
        calls = [ast.unparse(node.func) for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(('ArgumentParser', 'build_parser'))]
        assert calls and set(calls) <= {'cli.ArgumentParser', 'build_parser', 'train_flags.build_parser'}, (path, calls)
        assert path.name in ('train.py', 'train_ml.py') or 'cli.ArgumentParser' in calls, (path, calls)
    assert cli.ArgumentParser().allow_abbrev is False


@pytest.mark.parametrize('argv,flag', [(['--lr', '1e-3'], '--lr'), (['--base_l', '1e-3'], '--base_l'),
                                       (['--total_epoch', '3'], '--total_epoch')])
def test_abbreviations_are_refused(argv, flag, capsys):
    """A prefix of a flag is not that flag: '--lr 1e-3' is not read as --lr_decay_type, '--base_l' not as
    --base_lr."""
    err = parse_error(train_script, argv, capsys)
    assert 'error: unrecognized arguments: {} '.format(flag) in err, err


@pytest.mark.parametrize('argv,message', [
    (['--total_epoch', '3'], 'unrecognized arguments: --total_epoch 3'),
    (['--train_dataset', 'nowhere'], "--train_dataset 'nowhere' is unknown"),
    (['--resume', 'maybe'], 'argument --resume: invalid boolean value'),
])
def test_a_usage_error_is_one_line(argv, message, capsys):
    """The refusal comes alone, first and last: '<script>: error: <message>; see <script> --help', no usage block."""
    err = parse_error(train_script, argv, capsys)
    assert err.count('\n') == 1 and err.endswith(' --help\n') and 'usage:' not in err, err
    assert ': error: {}'.format(message) in err


def test_workers_default_fits_the_cpus(monkeypatch):
    """--workers defaults to min(4, CPUs this process may use) in every script that decodes images."""
    for cpus, expected in (({0}, 1), ({0, 1}, 2), (set(range(16)), 4)):
        monkeypatch.setattr(os, 'sched_getaffinity', lambda pid, cpus=cpus: cpus, raising=False)
        for name in ('train', 'test', 'extract', 'search'):
            parser = load_script('script', name).build_parser()
            assert parser.get_default('workers') == expected, (name, cpus)


def test_a_folder_given_as_partitions_file_is_named(tmp_path, capsys):
    prepared = tmp_path / 'prepared'
    _partitions(str(prepared / 'partitions.pkl'))
    empty = tmp_path / 'empty'
    empty.mkdir()
    err = parse_error(train_script, ['--train_partitons', str(prepared), '--exp_dir', str(tmp_path / 'x')], capsys)
    assert '--train_partitons: {} is a folder; the partitions file is the partitions.pkl in it: give {}'.format(
        prepared, prepared / 'partitions.pkl') in err and 'not found' not in err
    err = parse_error(train_script, ['--train_partitons', str(empty), '--exp_dir', str(tmp_path / 'x')], capsys)
    assert '--train_partitons: {} is a folder without a partitions.pkl'.format(empty) in err
    weights = tmp_path / 'w.pth'
    weights.write_bytes(b'')
    err = parse_error(test_script, ['--model_weight_file', str(weights), '--test_partitons', str(prepared)], capsys)
    assert '--test_partitons: {} is a folder; the partitions file is the partitions.pkl in it'.format(prepared) in err
    with pytest.raises(FileNotFoundError, match='is a folder'):
        data.read_partitions(str(prepared))


def test_a_run_is_named_after_the_dataset_its_partitions_record(tmp_path, monkeypatch):
    """Without --train_dataset the name recorded by the prepare script labels the run (its log lines, its
    experiment folder exp/train/<name>); a file without one keeps market1501; --train_dataset wins."""
    monkeypatch.chdir(tmp_path)
    small = ['--ids_per_batch', '2', '--ims_per_id', '2', '--device', 'cpu']
    synthetic = _partitions(str(tmp_path / 'syn' / 'partitions.pkl'), dataset='synthetic')
    args = train_script.parse_args(['--train_partitons', synthetic] + small)
    assert args.train_dataset == 'synthetic'
    assert args.exp_dir == str(tmp_path / 'exp' / 'train' / 'synthetic')
    args = load_script('script', 'train_ml').parse_args(['--train_partitons', synthetic] + small)
    assert args.exp_dir == str(tmp_path / 'exp' / 'train_ml' / 'synthetic')
    unnamed = _partitions(str(tmp_path / 'old' / 'partitions.pkl'))
    assert train_script.parse_args(['--train_partitons', unnamed] + small).train_dataset == 'market1501'
    args = train_script.parse_args(['--train_partitons', synthetic, '--train_dataset', 'mine'] + small)
    assert (args.train_dataset, os.path.basename(args.exp_dir)) == ('mine', 'mine')
