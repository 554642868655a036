"""The wheel ships the presets; the README preset table is generated.

The full check (a fresh venv without system site-packages installing the
wheel and building every preset) is `scripts/check_wheel.sh`; here the wheel
is built without isolation (no download) and inspected, and the installed
layout is imported from the unpacked wheel in a fresh process.
"""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import BACKEND

# The wheel, its layout and the README: the same on every backend.
pytestmark = pytest.mark.backend_independent

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("keras_mobile_moe", "presets"):
        shutil.copytree(
            ROOT / name,
            source / name,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(work / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (work / "dist").glob("keras_mobile_moe-*.whl")
    return path


def test_wheel_contains_every_preset_and_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (ROOT / "presets").glob("*.json"):
        assert f"keras_mobile_moe/_presets/{path.name}" in names, path.name
    for init in (ROOT / "keras_mobile_moe").rglob("__init__.py"):
        relative = init.relative_to(ROOT).as_posix()
        assert relative in names, relative
    assert "keras_mobile_moe/datasets/cifar100_fixture.npz" in names
    assert not any(n.startswith(("tests/", "presets/")) for n in names)


def test_unpacked_wheel_lists_and_builds_presets(wheel, tmp_path):
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    script = (
        "import json, keras_mobile_moe as kmm\n"
        "from keras_mobile_moe import preset_registry\n"
        "model = kmm.MobileVMoE.from_preset('tiny_e10', load_weights=False)\n"
        "print(json.dumps({'file': kmm.__file__,"
        " 'presets': str(preset_registry.presets_dir()),"
        " 'names': sorted(kmm.MobileVMoE.presets),"
        " 'params': model.count_params()}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "KERAS_BACKEND": BACKEND}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(target))
    assert out["presets"] == str(target / "keras_mobile_moe" / "_presets")
    assert "tiny_e10" in out["names"] and "6x64" in out["names"]
    entry = json.loads((ROOT / "presets" / "12x192_e10.json").read_text())
    assert out["params"] == entry["params"]


def test_readme_preset_table_is_generated_from_the_registry():
    spec = importlib.util.spec_from_file_location(
        "make_preset_table", ROOT / "scripts" / "make_preset_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from keras_mobile_moe import preset_registry

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert module.render(text, preset_registry.markdown_table()) == text, (
        "README.md preset table is stale: run "
        "python scripts/make_preset_table.py"
    )
    for name in preset_registry.load_registry():
        assert f"`{name}`" in text, name
    with pytest.raises(ValueError, match="exactly one"):
        module.render("no markers", "table")
