"""Imports a script of data_set/ or script/ as a module (they are files, not a package), for tests."""
import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_script(folder, name):
    """The module of REPO/folder/name.py, e.g. load_script('data_set', 'market1501_prepare')."""
    spec = importlib.util.spec_from_file_location(f'{folder}_{name}', REPO / folder / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
