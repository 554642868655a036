"""The package list for setuptools; everything else is in pyproject.toml.

The top-level `presets/` folder ships inside the wheel as the package
`keras_mobile_moe._presets` (mapped by `package-dir` in pyproject.toml).
Package discovery only finds folders that exist under their own name, so the
mapped package is added here next to the discovered ones.
"""

from setuptools import find_packages
from setuptools import setup

setup(
    packages=find_packages(include=["keras_mobile_moe", "keras_mobile_moe.*"])
    + ["keras_mobile_moe._presets"]
)
