"""Tests of aligned_reid.cli: the boolean words the flags take, and logging to the console and a file
(rank 0 only)."""
import os

import pytest

from aligned_reid import cli


@pytest.mark.parametrize('word,value', [
    ('true', True), ('True', True), ('TRUE', True), ('yes', True), ('Yes', True), ('1', True),
    ('false', False), ('False', False), ('no', False), ('NO', False), ('0', False), (True, True), (False, False),
])
def test_str2bool_words(word, value):
    assert cli.str2bool(word) is value


@pytest.mark.parametrize('word', ['maybe', '', '2', 'tru'])
def test_str2bool_rejects(word):
    with pytest.raises(ValueError, match='boolean'):
        cli.str2bool(word)


def test_logging_to_file(tmp_path, capsys):
    log_file = str(tmp_path / 'log' / 'train.log')
    logger = cli.setup_logging(log_file, name='test_utils_logger')
    logger.info('hello %d', 7)
    for h in logger.handlers:
        h.flush()
    assert 'hello 7' in open(log_file).read()
    assert 'hello 7' in capsys.readouterr().out
    quiet = cli.setup_logging(str(tmp_path / 'other.log'), name='test_utils_quiet', main_process=False)
    quiet.info('hidden')
    assert not os.path.exists(tmp_path / 'other.log')
