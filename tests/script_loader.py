"""Kept so that `from script_loader import load_script` in test files written before the move still
works; the one definition is conftest.load_script, which new tests import."""
from conftest import REPO, load_script

__all__ = ['REPO', 'load_script']
