"""Shared by the test modules: this directory is on ``sys.path`` (pytest puts a
conftest's directory there), so tests in subdirectories can import helpers kept
here, such as :mod:`hlo_order`."""
