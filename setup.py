# The C data plane (bpfdumpfs/core.c) is compiled at install by cffi; everything
# else is declared in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["bpfdumpfs/core_build.py:ffibuilder"])
