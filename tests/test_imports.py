"""The import graph: every module of aligned_reid imports, and no import cycle between them."""
import ast
import importlib
import pathlib

import aligned_reid

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


