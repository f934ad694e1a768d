"""Fault injection on dataset preparation: undecodable images (folder and zip, stop or --skip_bad_images),
an --overwrite interrupted by SIGINT or by an error, a hard kill during the final swap, odd raw inputs."""
import os
import pathlib
import re
import signal
import zipfile

import pytest

from aligned_reid import prepare
from aligned_reid.data import read_partitions
from conftest import REPO, build_market_tree, load_script, tree_digest

pytestmark = pytest.mark.filterwarnings('ignore:.*counts differ from the official ones')
market_script = load_script('data_set', 'market1501_prepare')
TOP = 'Market-1501-v15.09.15'


def _damage(raw):
    """Empties one training image, truncates one gallery image, and puts text in a query .jpg.
    Returns their paths, as prepare names them."""
    top = pathlib.Path(raw) / TOP
    train = sorted((top / 'bounding_box_train').glob('0007_*.jpg'))[0]
    gallery = sorted((top / 'bounding_box_test').glob('0041_*.jpg'))[0]
    query = sorted((top / 'query').glob('0042_*.jpg'))[0]
    train.write_bytes(b'')
    data = gallery.read_bytes()
    gallery.write_bytes(data[:len(data) // 2])
    query.write_text('<html>404 not found</html>')
    return [str(train), str(gallery), str(query)]


def _zip_tree(raw, path):
    with zipfile.ZipFile(path, 'w') as zf:
        for p in sorted(pathlib.Path(raw).rglob('*')):
            if p.is_file():
                zf.write(p, str(p.relative_to(raw)))
    return path


def test_undecodable_images_stop_with_their_list_or_are_skipped(tmp_path, capsys):
    build_market_tree(tmp_path / 'raw')
    n_good = len(prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'good', num_val_ids=1,
                                               verbose=False)['trainval_im_names'])
    bad = _damage(tmp_path / 'raw')
    raw_before = tree_digest(tmp_path / 'raw')
    zip_path = _zip_tree(tmp_path / 'raw', tmp_path / 'market.zip')
    for src, named in ((str(tmp_path / 'raw'), bad),
                       (str(zip_path), ['{}:{}'.format(zip_path, os.path.relpath(b, tmp_path / 'raw')) for b in bad])):
        out = tmp_path / ('out_zip' if src.endswith('.zip') else 'out')
        flag = ['--zip_file' if src.endswith('.zip') else '--raw_dir', src]
        with pytest.raises(SystemExit) as e:
            market_script.run_cli(lambda: market_script.main(flag + ['--save_dir', str(out), '--num_val_ids', '1']))
        message = str(e.value.code)
        assert message.startswith('error: 3 of ') and 'cannot be decoded' in message and '--skip_bad_images' in message
        for name in named:
            assert name in message
        assert 'empty file' in message and 'truncated' in message.lower() and 'identify' in message
        assert not out.exists() or not os.listdir(out)  # nothing written

        part = market_script.main(flag + ['--save_dir', str(out), '--num_val_ids', '1', '--skip_bad_images'])
        printed = capsys.readouterr().out
        assert '--skip_bad_images: left out 3 of' in printed and all(name in printed for name in named)
        assert len(part['trainval_im_names']) == n_good - 1
        assert sorted(os.listdir(out / 'images')) == sorted(part['trainval_im_names'] + part['test_im_names'])
    assert tree_digest(tmp_path / 'raw') == raw_before  # the raw download is never touched


def test_decode_problem_reasons(tmp_path):
    build_market_tree(tmp_path / 'raw')
    good = next((tmp_path / 'raw' / TOP / 'query').glob('*.jpg'))
    assert prepare.decode_problem(str(good)) is None
    assert prepare.decode_problem(lambda: None) is None  # rendered / .mat images are not checked
    with pytest.raises(FileNotFoundError, match='image listed but missing: .*nowhere.jpg'):
        prepare.decode_problem(str(tmp_path / 'nowhere.jpg'))


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt, as in a terminal, even where the runner was started with SIGINT
    ignored (a background job)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _old_set(tmp_path):
    build_market_tree(tmp_path / 'raw')
    prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'out', num_val_ids=1, verbose=False)
    return tree_digest(tmp_path / 'out')


def test_sigint_during_overwrite_keeps_the_old_set_and_a_rerun_works(tmp_path, monkeypatch, sigint_raises):
    before = _old_set(tmp_path)
    calls, original = [], prepare._Writer.write

    def interrupted(self, src, dst):
        calls.append(dst)
        if len(calls) == 10:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of writing the new images
        return original(self, src, dst)
    monkeypatch.setattr(prepare._Writer, 'write', interrupted)
    with pytest.raises(KeyboardInterrupt):
        market_script.main(['--raw_dir', str(tmp_path / 'raw'), '--save_dir', str(tmp_path / 'out'),
                            '--num_val_ids', '2', '--overwrite'])
    assert len(calls) == 10
    assert tree_digest(tmp_path / 'out') == before  # the old set whole, nothing left beside it
    monkeypatch.setattr(prepare._Writer, 'write', original)
    with pytest.raises(FileExistsError, match='already holds a prepared dataset'):
        market_script.main(['--raw_dir', str(tmp_path / 'raw'), '--save_dir', str(tmp_path / 'out')])
    part = market_script.main(['--raw_dir', str(tmp_path / 'raw'), '--save_dir', str(tmp_path / 'out'),
                               '--num_val_ids', '2', '--overwrite'])
    assert read_partitions(str(tmp_path / 'out' / 'partitions.pkl')) == part
    assert sorted(os.listdir(tmp_path / 'out')) == ['images', 'partitions.pkl']


def test_signal_during_the_swap_waits_until_it_is_done(tmp_path, monkeypatch, sigint_raises):
    _old_set(tmp_path)
    real_replace = os.replace
    seen = []

    def replace(a, b):
        if str(b).endswith('images.old'):
            os.kill(os.getpid(), signal.SIGINT)  # arrives as the swap's three renames begin
        seen.append(os.path.basename(b))
        return real_replace(a, b)
    monkeypatch.setattr(prepare.os, 'replace', replace)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_market_layout(tmp_path / 'raw', tmp_path / 'out', num_val_ids=2, overwrite=True,
                                      verbose=False)
    monkeypatch.setattr(prepare.os, 'replace', real_replace)
    assert seen[-3:] == ['images.old', 'images', 'partitions.pkl']
    # the swap completed: the new set (2 validation ids) is in place, consistent with its images
    part = read_partitions(str(tmp_path / 'out' / 'partitions.pkl'))
    assert len({n.split('_')[0] for n in part['val_im_names']}) == 2
    assert set(part['trainval_im_names'] + part['test_im_names']) == set(os.listdir(tmp_path / 'out' / 'images'))
    # the old images the interrupted run did not get to delete go at the next run
    assert (tmp_path / 'out' / 'images.old').is_dir()
    prepare.check_save_dir(tmp_path / 'out', overwrite=True)
    assert sorted(os.listdir(tmp_path / 'out')) == ['images', 'partitions.pkl']


def test_hard_kill_between_the_renames_is_undone(tmp_path, capsys):
    """The state a SIGKILL between 'images -> images.old' and the partitions rename leaves: the next run
    puts the old set back."""
    before = _old_set(tmp_path)
    out = tmp_path / 'out'
    os.rename(out / 'images', out / 'images.old')
    (out / 'images').mkdir()
    (out / 'images' / '00000001_0001_00000000.jpg').write_bytes(b'new')
    (out / 'partitions.pkl.partial').write_bytes(b'new partitions')
    with pytest.raises(FileExistsError):
        prepare.check_save_dir(out)
    assert 'restored the previous set' in capsys.readouterr().out
    assert tree_digest(out) == before


def test_raw_input_messages(tmp_path):
    not_zip = tmp_path / 'Market-1501-v15.09.15.zip'
    not_zip.write_bytes(b'<html>interrupted download</html>')
    with pytest.raises(ValueError, match='is neither a folder nor a zip archive'):
        prepare.prepare_market_layout(not_zip, tmp_path / 'out', verbose=False)
    with zipfile.ZipFile(tmp_path / 'other.zip', 'w') as zf:
        zf.writestr('readme.txt', 'x')
    with pytest.raises(ValueError) as e:
        prepare.prepare_market_layout(tmp_path / 'other.zip', tmp_path / 'out', verbose=False)
    assert "the zip holds no 'bounding_box_train/' folder" in str(e.value) and 'no a ' not in str(e.value)
    for name in ('msmt17_prepare', 'cuhk03_prepare'):
        script = load_script('data_set', name)
        with pytest.raises(ValueError, match='is neither a folder nor a zip archive'):
            script.main(['--zip_file', str(not_zip), '--save_dir', str(tmp_path / name)])


def test_every_prepare_script_has_skip_bad_images():
    for name in ('market1501_prepare', 'duke_prepare', 'cuhk03_prepare', 'msmt17_prepare', 'combine_all'):
        parser = load_script('data_set', name).build_parser()
        assert parser.parse_args(['--skip_bad_images']).skip_bad_images is True
        assert parser.parse_args([]).skip_bad_images is False


def _readme_flags(cell):
    return set(re.findall(r'`(--\w+)`', cell))


def test_data_set_readme_flag_lists_match_the_scripts():
    """data_set/README.md's shared-flag table plus each script's row name exactly the flags of its --help."""
    text = (REPO / 'data_set' / 'README.md').read_text()
    shared_table = text.split('Flags shared by the scripts')[1].split('Flags of one script')[0]
    shared = set()
    for line in shared_table.splitlines():
        if line.startswith('| `'):
            shared |= _readme_flags(line.split('|')[1])
    own_table = text.split('Flags of one script')[1].split('\n\n')[1]
    rows = {}
    for line in own_table.splitlines():
        m = re.match(r'\| `(\w+)\.py` \| (.*)\|$', line)
        if m:
            rows[m.group(1)] = _readme_flags(m.group(2).split('(')[0])
    assert set(rows) == {'market1501_prepare', 'duke_prepare', 'cuhk03_prepare', 'msmt17_prepare', 'combine_all',
                         'synthetic_prepare'}
    for name, own in rows.items():
        parser = load_script('data_set', name).build_parser()
        flags = {o for a in parser._actions for o in a.option_strings if o.startswith('--') and o != '--help'}
        documented = own if name in ('combine_all', 'synthetic_prepare') else shared | own
        assert flags == documented, (name, flags ^ documented)


def test_unwritable_save_dir_is_one_line(tmp_path):
    build_market_tree(tmp_path / 'raw')
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    with pytest.raises(SystemExit) as e:
        market_script.run_cli(lambda: market_script.main(['--raw_dir', str(tmp_path / 'raw'), '--save_dir',
                                                          str(blocker / 'market'), '--num_val_ids', '1']))
    assert e.value.code == 'error: {}: Not a directory; a set prepared there before is intact'.format(blocker / 'market')
    assert blocker.read_text() == 'not a folder'
