"""Shared pytest fixtures of the test suite (the tiny trainer model, data).

The fixtures live in :mod:`tests.train_fixtures`; importing them here makes them
available to every test module without imports or ``sys.path`` edits.
"""

from tests.train_fixtures import TINY_TEST_MODEL, problems, tiny, tiny_dir

__all__ = ["TINY_TEST_MODEL", "problems", "tiny", "tiny_dir"]
