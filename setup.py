"""Build script. The metadata lives in pyproject.toml; this file exists so that the CUDA extension
(csrc/, arriving with the kernels) can be added where nvcc and a CUDA build of torch are present."""
from setuptools import setup

setup()
