"""Runs every guide in guides/ in smoke mode (KMM_GUIDE_SMOKE=1).

Each guide runs in a subprocess on the backend of KERAS_BACKEND. The guides
that load a pretrained Mobile V-MoE get tiny presets trained here with
training/train.py on the committed fixture (32x32 input, patch 8, 2 layers,
width 16, 4 experts), so the tests never depend on published weights. Every
test checks the files and numbers the guide promises (its results JSON,
plots, exported files), not only its exit status.
"""

import json
import math
import os
import subprocess
import sys

import keras
import pytest

from conftest import TINY_TRAIN_ARGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDES = os.path.join(ROOT, "guides")
TRAIN = os.path.join(ROOT, "training", "train.py")
TINY_ARGS = [*TINY_TRAIN_ARGS, "--epochs=1", "--max_steps_per_epoch=4"]


def env(**extra):
    out = dict(os.environ)
    out["KERAS_BACKEND"] = keras.config.backend()
    out.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out.pop("KMM_CIFAR100_PATH", None)  # smoke runs use the fixture anyway
    out["KMM_GUIDE_SMOKE"] = "1"
    out.update(extra)
    return out


def run(command, timeout, **extra):
    result = subprocess.run(
        command,
        env=env(**extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    """Tiny trained Mobile V-MoE (E=4) and dense presets."""
    root = tmp_path_factory.mktemp("guide_presets")
    moe, dense = str(root / "moe"), str(root / "dense")
    run(
        [
            sys.executable,
            TRAIN,
            "--preset=6x64_e10",
            "--routing=random",
            "--num_experts=4",
            f"--workdir={moe}",
            *TINY_ARGS,
        ],
        timeout=300,
    )
    run(
        [
            sys.executable,
            TRAIN,
            "--preset=6x64",
            f"--workdir={dense}",
            *TINY_ARGS,
        ],
        timeout=300,
    )
    return os.path.join(moe, "preset"), os.path.join(dense, "preset")


def run_guide(name, output_dir, timeout=300, **extra):
    stdout = run(
        [sys.executable, os.path.join(GUIDES, name)],
        timeout,
        KMM_GUIDE_OUTPUT_DIR=str(output_dir),
        **extra,
    )
    results_file = os.path.join(str(output_dir), name.replace(".py", ".json"))
    assert os.path.isfile(results_file), stdout[-3000:]
    with open(results_file, encoding="utf-8") as f:
        return stdout, json.load(f)


def is_fraction(value):
    return isinstance(value, float) and 0.0 <= value <= 1.0


@pytest.mark.backend_independent  # a directory listing
def test_every_guide_is_tested():
    # guide_helpers.py holds what several guides share; it is not a guide.
    guides = sorted(
        f
        for f in os.listdir(GUIDES)
        if f.endswith(".py") and f != "guide_helpers.py"
    )
    assert guides == [
        "deploying_to_a_phone.py",
        "fine_tuning.py",
        "getting_started.py",
        "mone_budgets.py",
        "understanding_routing.py",
        "upcycling_a_hub_vit.py",
    ]


def test_getting_started(presets, tmp_path):
    moe, dense = presets
    stdout, results = run_guide(
        "getting_started.py",
        tmp_path,
        KMM_GUIDE_PRESET=moe,
        KMM_GUIDE_DENSE_PRESET=dense,
    )
    assert "top-1 accuracy on 200 test images" in stdout
    assert "-> expert" in stdout
    assert is_fraction(results["top1"])
    assert results["dense_trained"] and is_fraction(results["dense_top1"])
    # Same FLOPs (the router is the only extra), more parameters.
    assert (
        results["dense_flops"]
        < results["moe_flops"]
        < 1.01 * results["dense_flops"]
    )
    assert results["moe_params"] > results["dense_params"]


def test_getting_started_without_dense_preset(presets, tmp_path):
    moe, _ = presets
    stdout, results = run_guide(
        "getting_started.py",
        tmp_path,
        KMM_GUIDE_PRESET=moe,
        KMM_GUIDE_DENSE_PRESET=str(tmp_path / "no_such_preset"),
    )
    assert "is not available" in stdout
    assert not results["dense_trained"] and results["dense_top1"] is None
    assert results["moe_params"] > results["dense_params"]


def test_fine_tuning(presets, tmp_path):
    moe, _ = presets
    stdout, results = run_guide(
        "fine_tuning.py", tmp_path, KMM_GUIDE_PRESET=moe
    )
    table = results["superclass_ids"]
    # 20 coarse classes in 4 balanced groups (one per expert of the preset).
    assert len(table) == 20 and sorted(set(table)) == [0, 1, 2, 3]
    assert all(table.count(g) == 5 for g in range(4))
    for key in (
        "probe_accuracy",
        "test_accuracy_before",
        "test_accuracy_after",
        "router_accuracy_before",
        "router_accuracy_after",
    ):
        assert is_fraction(results[key]), key
    assert all(math.isfinite(v) for v in results["train_loss"])
    assert results["reload_max_abs_difference"] < 1e-4
    assert os.path.isfile(os.path.join(results["preset_dir"], "config.json"))
    assert "expert 3:" in stdout


def test_understanding_routing(presets, tmp_path):
    moe, _ = presets
    stdout, results = run_guide(
        "understanding_routing.py", tmp_path, KMM_GUIDE_PRESET=moe
    )
    assert results["num_experts"] == 4 and results["num_images"] == 100
    assert is_fraction(results["top1"]) and is_fraction(
        results["router_accuracy"]
    )
    for shares in (results["load"], results["target_share"]):
        assert len(shares) == 4 and abs(sum(shares) - 1.0) < 1e-6
    assert os.path.getsize(results["heatmap"]) > 10_000  # a real PNG
    with open(results["heatmap"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "router accuracy:" in stdout


def test_mone_budgets(tmp_path):
    stdout, results = run_guide("mone_budgets.py", tmp_path)
    rows = results["rows"]
    assert results["trained_here"]
    assert [r["budget"] for r in rows] == [1.0, 0.5, 0.25]
    flops = [r["flops"] for r in rows]
    assert flops[0] > flops[1] > flops[2] > 0  # cheaper at lower budgets
    assert rows[0]["token_counts"] == [0, 0, 0, 16]  # budget 1: all full width
    assert all(sum(r["token_counts"]) == 16 for r in rows)
    assert all(is_fraction(r["top1"]) for r in rows)
    with open(results["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "expert of each patch" in stdout


@pytest.mark.only_on(
    "tensorflow",
    why=(
        "the guide converts TFLite files; every backend's export (through a "
        "subprocess) and its parity are tested in test_export.py"
    ),
)
def test_deploying_to_a_phone(presets, tmp_path):
    moe, _ = presets
    stdout, results = run_guide(
        "deploying_to_a_phone.py", tmp_path, timeout=400, KMM_GUIDE_PRESET=moe
    )
    modes = results["modes"]
    assert sorted(modes) == ["int8", "none"]
    for mode, row in modes.items():
        assert os.path.isfile(tmp_path / f"model_{mode}.tflite"), mode
        assert row["median_ms"] > 0
    # float32 matches Keras; int8 is smaller and still routes like Keras.
    assert modes["none"]["max_abs_logit_difference"] < 1e-3
    assert modes["none"]["top1_agreement"] == 1.0
    assert modes["none"]["routing_agreement"] == 1.0
    assert modes["int8"]["bytes"] < modes["none"]["bytes"]
    assert modes["int8"]["routing_agreement"] >= 0.9
    split = results["expert_split"]
    assert len(split["expert_bytes"]) == 4
    assert split["resident_bytes"] < split["single_file_bytes"]
    assert split["max_abs_logit_difference_vs_single_file"] < 1e-4
    assert os.path.isfile(tmp_path / "expert_split" / "trunk.tflite")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """An offline Hugging Face cache holding a small ViT checkpoint written
    by timm's own Hub-saving code (2 layers x 48, patch 8 at 32x32)."""
    from hub_helpers import write_snapshot
    from timm_helpers import import_timm
    from timm_helpers import save_timm_checkpoint

    timm = import_timm()
    args = dict(
        embed_dim=48,
        depth=2,
        num_heads=3,
        img_size=32,
        patch_size=8,
        num_classes=10,
    )
    model = timm.create_model("vit_small_patch32_224", **args).eval()
    root = tmp_path_factory.mktemp("guide_hub")
    folder = save_timm_checkpoint(model, str(root / "checkpoint"), args)
    cache = str(root / "hf_cache")
    write_snapshot(cache, "kmm-test/tiny-vit", folder)
    return cache


def test_upcycling_a_hub_vit(hub_cache, tmp_path):
    stdout, results = run_guide(
        "upcycling_a_hub_vit.py",
        tmp_path,
        timeout=400,
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=hub_cache,
        KMM_GUIDE_HUB_HANDLE="hf://kmm-test/tiny-vit",
        KMM_GUIDE_IMAGE_SIZE="32",
    )
    assert "loading hf://kmm-test/tiny-vit" in stdout
    table = results["superclass_ids"]
    assert len(table) == 100 and all(table.count(g) == 10 for g in range(10))
    # Upcycling with normalised gates keeps the dense function; the router
    # adds a little compute, the experts many parameters.
    assert results["upcycle_max_abs_difference"] < 1e-4
    assert (
        results["dense_flops"]
        < results["moe_flops"]
        < 1.05 * results["dense_flops"]
    )
    for key in (
        "probe_accuracy",
        "test_accuracy_before",
        "test_accuracy_after",
        "router_accuracy_before",
        "router_accuracy_after",
    ):
        assert is_fraction(results[key]), key
    assert all(math.isfinite(v) for v in results["train_loss"])
    tflite = results["tflite"]
    assert os.path.getsize(tflite["path"]) == tflite["bytes"] > 0
    assert tflite["routing_agreement"] >= 0.9 and is_fraction(
        tflite["top1_agreement"]
    )


# The guide stops at the Hub download, before any backend computes.
@pytest.mark.backend_independent
def test_upcycling_a_hub_vit_says_it_needs_internet(tmp_path):
    """Without the checkpoint in the cache and no network, the default mode
    stops with a message saying the guide needs internet."""
    result = subprocess.run(
        [sys.executable, os.path.join(GUIDES, "upcycling_a_hub_vit.py")],
        env=env(
            HF_HUB_OFFLINE="1",
            HF_HUB_CACHE=str(tmp_path / "empty"),
            KMM_GUIDE_OUTPUT_DIR=str(tmp_path),
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k" in result.stderr
    assert "it needs internet" in result.stderr
