"""Build script: the Python package (compiled kernels are added by later work)."""

from setuptools import setup

setup()
