"""The import graph: every module of aligned_reid imports and no import cycle between them; no script
(script/, bench/, data_set/) imports or loads another script: what two files use lives in the package."""
import ast
import importlib
import pathlib

import pytest

import aligned_reid
from conftest import REPO

PACKAGE = pathlib.Path(aligned_reid.__file__).resolve().parent


def _imports(path, module):
    """Names of the aligned_reid modules that `module` (file `path`) imports anywhere in it,
    function-level imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:                                  # from .x import y / from . import x
                base = node.module
                names = [base] if base else [a.name for a in node.names]
            elif node.module and node.module.startswith('aligned_reid'):
                rest = node.module[len('aligned_reid'):].lstrip('.')
                names = [rest] if rest else [a.name for a in node.names]
            else:
                continue
            found.update(n.split('.')[0] for n in names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith('aligned_reid.'):
                    found.add(a.name.split('.')[1])
    found.discard(module)
    return found


def test_every_module_imports_and_the_package_has_no_import_cycle():
    modules = sorted(p.stem for p in PACKAGE.glob('*.py') if p.stem != '__init__')
    assert {'distance', 'loss', 'evaluation', 're_ranking'} <= set(modules)
    graph = {}
    for name in modules:
        importlib.import_module(f'aligned_reid.{name}')
        graph[name] = _imports(PACKAGE / f'{name}.py', name) & set(modules)
    for a in modules:
        for b in graph[a]:
            assert a not in graph[b], f'aligned_reid.{a} and aligned_reid.{b} import each other'
    # No longer cycle either: depth-first search for a back edge.
    state = {}

    def visit(node, path):
        state[node] = 'open'
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 'open', 'import cycle: ' + ' -> '.join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 'done'

    for name in modules:
        if name not in state:
            visit(name, [name])
    assert 'evaluation' not in graph['re_ranking']
    assert 'distance' in graph['re_ranking'] and 'distance' in graph['loss']
    assert graph['distance'] == set()


def test_import_scanner_sees_relative_absolute_and_nested_imports(tmp_path):
    src = tmp_path / 'm.py'
    src.write_text('from .a import x\nfrom . import b\nimport aligned_reid.c\n'
                   'from aligned_reid import d\nimport numpy\n\ndef f():\n    from .e import y\n')
    assert _imports(src, 'm') == {'a', 'b', 'c', 'd', 'e'}


# ----------------------------------------------------------------------------- scripts

SCRIPT_FOLDERS = ('script', 'bench', 'data_set')
SCRIPTS = sorted(p.relative_to(REPO).as_posix() for folder in SCRIPT_FOLDERS for p in (REPO / folder).glob('*.py'))
# Calls that load code by file path or by a computed name: in a script they can only load another script.
LOADERS = {'spec_from_file_location', 'SourceFileLoader', 'load_source', 'run_path', 'run_module', 'import_module',
           '__import__'}
# Scripts that still load another one, each with what keeps it so.
STILL_LOADING = {
}


def _script_imports(path, script_names):
    """(line, what) of each place where the file `path` imports a script by its module name
    (`import train`, `from search import x`, a relative import), loads code through importlib or runpy
    (`spec_from_file_location`, `import_module`, `run_path`, ...), or edits sys.path to reach one."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, 'import ' + a.name) for a in node.names if a.name.split('.')[0] in script_names]
        elif isinstance(node, ast.ImportFrom):
            if node.level or (node.module or '').split('.')[0] in script_names:
                found.append((node.lineno, 'from {}{} import'.format('.' * node.level, node.module or '')))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, 'id', None)
            if name in LOADERS:
                found.append((node.lineno, name + '()'))
            elif (name in ('insert', 'append', 'extend') and isinstance(func.value, ast.Attribute)
                  and func.value.attr == 'path' and getattr(func.value.value, 'id', None) == 'sys'):
                found.append((node.lineno, 'sys.path.' + name + '()'))
    return sorted(found)


def test_script_import_scanner_sees_names_loaders_and_path_edits(tmp_path):
    src = tmp_path / 'm.py'
    src.write_text('import os, train\nimport numpy\nfrom search import main\nfrom . import extract\n'
                   'from aligned_reid import evaluation\nimport importlib.util\nimport runpy, sys\n\n'
                   'def f():\n    import train_ml as ml\n'
                   '    spec = importlib.util.spec_from_file_location("x", "script/test.py")\n'
                   '    runpy.run_path("bench/evaluation.py")\n    sys.path.insert(0, "bench")\n'
                   '    return importlib.import_module("evaluation")\n')
    names = {'train', 'train_ml', 'search', 'extract', 'evaluation', 'test'}
    assert _script_imports(src, names) == [
        (1, 'import train'), (3, 'from search import'), (4, 'from . import'), (10, 'import train_ml'),
        (11, 'spec_from_file_location()'), (12, 'run_path()'), (13, 'sys.path.insert()'), (14, 'import_module()')]


@pytest.mark.parametrize('script', [
    pytest.param(s, marks=pytest.mark.xfail(strict=False, reason=STILL_LOADING[s])) if s in STILL_LOADING else s
    for s in SCRIPTS])
def test_no_script_imports_another_script(script):
    assert {'script/train.py', 'script/train_ml.py', 'bench/inference.py', 'data_set/market1501_prepare.py'} <= \
        set(SCRIPTS)
    # a script is a file run as a program; a helper module beside the benches (bench/re_ranking_numpy.py, the
    # baseline implementation) is imported like a library
    names = {pathlib.Path(s).stem for s in SCRIPTS if "__name__ == '__main__'" in (REPO / s).read_text()}
    assert 'evaluation' in names and 're_ranking_numpy' not in names
    found = _script_imports(REPO / script, names)
    assert found == [], '{} imports or loads another script: {}'.format(
        script, ', '.join('line {}: {}'.format(*f) for f in found))
