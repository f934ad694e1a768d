"""Tests of the documentation's commands: every `python <script>.py ...` (and `torchrun ... <script>.py ...`)
in README.md, docs/*.md and data_set/README.md names a script that exists and parses with that script's
own parser, so no page shows a flag the code does not take."""
import re
import shlex
from pathlib import Path

import pytest

from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / 'README.md', REPO / 'data_set' / 'README.md'] + sorted((REPO / 'docs').glob('*.md'))
FOLDERS = ('script', 'data_set', 'bench')


def _commands(text):
    """Command lines of a page: fenced blocks (backslash continuations joined, comments cut) and inline
    code spans, each from its python / torchrun word on."""
    lines = []
    for block in re.findall(r'```[^\n]*\n(.*?)```', text, flags=re.S):
        joined = re.sub(r'\\\n', ' ', block)
        lines += [re.sub(r'\s#\s.*$', '', line) for line in joined.splitlines()]
    lines += re.findall(r'`([^`\n]*\.py[^`\n]*)`', text)
    out = []
    for line in lines:
        m = re.search(r'(?:^|\s)(?:python3?|torchrun)\s.*?(\S+\.py)(\s.*)?$', line)
        if m:
            out.append((m.group(1), (m.group(2) or '').split('&&')[0].split(' | ')[0].strip()))
    return out


def _script(name):
    name = name.split('/')[-1]
    found = [folder for folder in FOLDERS if (REPO / folder / name).is_file()]
    return (found[0], name[:-3]) if found else None


CASES = [(page.relative_to(REPO).as_posix(), name, rest) for page in PAGES
         for name, rest in _commands(page.read_text(encoding='utf-8'))]


def test_the_pages_show_commands():
    pages = {page for page, _, _ in CASES}
    assert {'README.md', 'docs/training.md', 'docs/testing.md', 'docs/trained-model.md'} <= pages
    assert len(CASES) > 40


@pytest.mark.parametrize('page, name, rest', CASES, ids=['{}: {} {}'.format(p, n, r)[:90] for p, n, r in CASES])
def test_documented_command_parses(page, name, rest, capsys, monkeypatch):
    where = _script(name)
    assert where is not None, '{} shows {}, which is in none of {}'.format(page, name, FOLDERS)
    monkeypatch.syspath_prepend(str(REPO / where[0]))  # as for a program: its folder first on sys.path
    module = load_script(*where)
    rest = re.sub(r'\[[^\]]*\.\.\.[^\]]*\]', '', rest)  # optional parts written as [--seeds ...]
    tokens = [t for t in shlex.split(rest) if t != '...']
    parser = module.build_parser()
    try:
        parser.parse_args(tokens)
    except SystemExit as e:
        if e.code not in (0, None):
            pytest.fail('{}: `{} {}` does not parse: {}'.format(page, name, rest, capsys.readouterr().err.strip()))
