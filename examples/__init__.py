"""Runnable examples (``python examples/quickstart.py``); a package so the tests import them."""
