"""The tree stays clean under the ruff configuration in pyproject.toml
(keras-hub's style, 80 columns): `make lint` in CI's test run."""

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.backend_independent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ruff(*args):
    # The ruff wheel installs its binary beside the interpreter.
    binary = os.path.join(os.path.dirname(sys.executable), "ruff")
    binary = binary if os.path.exists(binary) else shutil.which("ruff")
    assert binary, "ruff is missing: pip install -e '.[dev]'"
    return subprocess.run(
        [binary, *args], cwd=ROOT, capture_output=True, text=True
    )


def test_ruff_check_passes():
    result = ruff("check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_leaves_every_file_unchanged():
    result = ruff("format", "--check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr
