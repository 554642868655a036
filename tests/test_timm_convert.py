"""timm and keras-hub ViT checkpoints load into the Mobile V-MoE and MoNE
families.

Each checkpoint is written by its own library (timm's `save_for_hf`, the
code `push_to_hf_hub` runs before uploading; keras-hub's `save_to_preset`)
into a real Hugging Face cache, loaded offline through `hf://`, and the
logits are compared with the peer's own forward pass on the CIFAR-100
fixture images. Runs on the backend in KERAS_BACKEND."""

import json
import os
import shutil

import keras
import numpy as np
import pytest

import keras_mobile_moe as kmm
from conftest import to_numpy
from hub_helpers import write_snapshot
from keras_mobile_moe.convert import common
from timm_helpers import import_timm
from timm_helpers import save_timm_checkpoint
from timm_helpers import timm_logits

timm = import_timm()
import torch  # noqa: E402  (after timm_helpers set torchvision up)

REPO = "timm/vit_small_patch32_224.augreg_in21k_ft_in1k"
SMALL_ARGS = dict(
    embed_dim=48,
    depth=2,
    num_heads=3,
    img_size=32,
    patch_size=8,
    num_classes=10,
)
TOLERANCE = 1e-4


def randomize(model, seed=0):
    """timm initialises biases, norms and tokens to constants; random values
    make every tensor's mapping matter."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "token" in name or "pos_embed" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def small_timm_model(**overrides):
    args = {**SMALL_ARGS, **overrides}
    torch.manual_seed(0)  # timm's own initialisation, then `randomize`
    return randomize(timm.create_model("vit_small_patch32_224", **args)), args


def raw_images(n=16):
    return kmm.datasets.cifar100.load_fixture()["x_test"][:n]


def timm_normalize(images, model):
    """What timm's eval transform does after resizing: [0, 1], mean, std."""
    config = model.pretrained_cfg
    mean = np.array(config["mean"], "float32")
    std = np.array(config["std"], "float32")
    return ((images.astype("float32") / 255.0 - mean) / std).astype("float32")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = str(tmp_path / "hf_cache")
    os.makedirs(cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    model, args = small_timm_model()
    folder = str(tmp_path_factory.mktemp("timm") / "small")
    save_timm_checkpoint(model, folder, model_args=args)
    return model, folder


def publish(cache, folder, repo=REPO, revision="main"):
    write_snapshot(cache, repo, folder, revision)
    return f"hf://{repo}"


def test_timm_checkpoint_loads_through_hf_with_timms_logits(
    small_checkpoint, hf_cache
):
    reference, folder = small_checkpoint
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    handle = publish(hf_cache, folder)
    model = kmm.MobileVMoE.from_preset(handle)
    assert model.backbone.num_moe_layers == 0
    assert model.backbone.mlp_activation == "gelu"
    assert model.num_classes == 10
    images = raw_images()
    # The preprocessor comes from the checkpoint's pretrained_cfg.
    ours = to_numpy(model.predict(images, verbose=0))
    theirs = timm_logits(reference, timm_normalize(images, reference))
    assert np.abs(ours - theirs).max() <= TOLERANCE
    # A real function, not constants (seeded weights: 0.147 overall, 0.0019
    # across images).
    assert theirs.std() > 0.1
    assert (theirs - theirs.mean(axis=0)).std() > 1e-3


def test_timm_backbone_matches_forward_features(small_checkpoint, hf_cache):
    reference, folder = small_checkpoint
    backbone = kmm.models.MobileVMoEBackbone.from_preset(
        publish(hf_cache, folder)
    )
    x = timm_normalize(raw_images(8), reference)
    ours = to_numpy(backbone(x)["sequence_output"])
    with torch.no_grad():
        theirs = reference.forward_features(
            torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        ).numpy()
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_pinned_revision_and_local_folder(small_checkpoint, hf_cache, tmp_path):
    reference, folder = small_checkpoint
    other, args = small_timm_model()
    randomize(other, seed=1)
    other_folder = str(tmp_path / "other")
    save_timm_checkpoint(other, other_folder, model_args=args)
    publish(hf_cache, folder, revision="v1")
    publish(hf_cache, other_folder, revision="main")
    x = timm_normalize(raw_images(4), reference)
    pinned = kmm.MobileVMoE.from_preset(f"hf://{REPO}/v1")
    assert (
        np.abs(to_numpy(pinned(x)) - timm_logits(reference, x)).max()
        <= TOLERANCE
    )
    latest = kmm.MobileVMoE.from_preset(f"hf://{REPO}")
    assert (
        np.abs(to_numpy(latest(x)) - timm_logits(other, x)).max() <= TOLERANCE
    )
    local = kmm.MobileVMoE.from_preset(folder)
    assert (
        np.abs(to_numpy(local(x)) - timm_logits(reference, x)).max()
        <= TOLERANCE
    )


def test_from_preset_upcycles_a_timm_checkpoint(small_checkpoint, hf_cache):
    reference, folder = small_checkpoint
    model = kmm.MobileVMoE.from_preset(
        publish(hf_cache, folder),
        num_experts=4,
        num_moe_layers=1,
        superclass_ids=[0, 0, 1, 1, 2, 2, 3, 3, 0, 1],
    )
    assert model.backbone.num_experts == 4
    assert model.backbone.num_moe_layers == 1
    assert model.superclass_ids == [0, 0, 1, 1, 2, 2, 3, 3, 0, 1]
    images = raw_images()
    ours = to_numpy(model.predict(images, verbose=0))
    theirs = timm_logits(reference, timm_normalize(images, reference))
    # normalize_gates=True (upcycle's default): the same function at init.
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_new_head_and_resampled_position_embedding(small_checkpoint, hf_cache):
    reference, folder = small_checkpoint
    handle = publish(hf_cache, folder)
    model = kmm.MobileVMoE.from_preset(handle, num_classes=3)
    assert model.num_classes == 3
    # At 48x48 the position embedding is resampled as timm does it.
    from timm.layers import resample_abs_pos_embed

    backbone = kmm.models.MobileVMoEBackbone.from_preset(
        handle, image_shape=(48, 48, 3)
    )
    theirs = resample_abs_pos_embed(
        reference.pos_embed.detach(),
        new_size=(6, 6),
        old_size=(4, 4),
        num_prefix_tokens=1,
    ).numpy()
    ours = to_numpy(backbone.patch_embedding.position_embedding)
    assert ours.shape == theirs.shape == (1, 37, 48)
    assert np.abs(ours - theirs).max() <= 1e-5
    # and then the whole model is timm's at 48x48
    timm48 = timm.create_model(
        "vit_small_patch32_224", **{**SMALL_ARGS, "img_size": 48}
    ).eval()
    state = reference.state_dict()
    state["pos_embed"] = torch.from_numpy(theirs)
    timm48.load_state_dict(state)
    big = raw_images(4).repeat(2, axis=1).repeat(2, axis=2)[:, :48, :48]
    x = timm_normalize(big, reference)
    with torch.no_grad():
        want = timm48.forward_features(
            torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        ).numpy()
    assert (
        np.abs(to_numpy(backbone(x)["sequence_output"]) - want).max()
        <= TOLERANCE
    )


# --- bad checkpoints ---------------------------------------------------------


def edited_copy(folder, tmp_path, name, edit_config=None, edit_tensors=None):
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file

    target = str(tmp_path / name)
    shutil.copytree(folder, target)
    if edit_config is not None:
        path = os.path.join(target, "config.json")
        config = json.load(open(path))
        edit_config(config)
        json.dump(config, open(path, "w"))
    if edit_tensors is not None:
        path = os.path.join(target, "model.safetensors")
        tensors = load_file(path)
        edit_tensors(tensors)
        save_file(tensors, path)
    return target


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "blocks.1.mlp.fc2.bias missing"),
        ("shape", "blocks.0.attn.qkv.weight: shape (100, 48)"),
        ("register", "register tokens"),
        ("layer_scale", "layer scale"),
        ("architecture", "architecture='convnext_tiny'"),
        ("model_args", "'reg_tokens'=4"),
        ("pool", "global_pool='avg'"),
    ],
)
def test_bad_checkpoints_raise_clear_errors(
    small_checkpoint, hf_cache, tmp_path, case, expected
):
    _, folder = small_checkpoint
    edits = {
        "missing": dict(edit_tensors=lambda t: t.pop("blocks.1.mlp.fc2.bias")),
        "shape": dict(
            edit_tensors=lambda t: t.update(
                {"blocks.0.attn.qkv.weight": np.zeros((100, 48), "float32")}
            )
        ),
        "register": dict(
            edit_tensors=lambda t: t.update(
                {"reg_token": np.zeros((1, 4, 48), "float32")}
            )
        ),
        "layer_scale": dict(
            edit_tensors=lambda t: t.update(
                {"blocks.0.ls1.gamma": np.ones((48,), "float32")}
            )
        ),
        "architecture": dict(
            edit_config=lambda c: c.update({"architecture": "convnext_tiny"})
        ),
        "model_args": dict(
            edit_config=lambda c: c["model_args"].update({"reg_tokens": 4})
        ),
        "pool": dict(edit_config=lambda c: c.update({"global_pool": "avg"})),
    }[case]
    bad = edited_copy(folder, tmp_path, case, **edits)
    repo = f"kmm-test/bad-{case.replace('_', '-')}"
    with pytest.raises(ValueError, match="Nothing was loaded") as error:
        kmm.MobileVMoE.from_preset(publish(hf_cache, bad, repo=repo))
    assert expected in str(error.value)


def test_pickle_only_checkpoint_is_refused(hf_cache, tmp_path, monkeypatch):
    model, args = small_timm_model()
    folder = str(tmp_path / "pickle")
    save_timm_checkpoint(model, folder, model_args=args, formats=("bin",))
    assert sorted(os.listdir(folder)) == ["config.json", "pytorch_model.bin"]
    opened = []
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: opened.append(a) or {}, raising=True
    )
    with pytest.raises(ValueError, match="pickle") as error:
        kmm.MobileVMoE.from_preset(
            publish(hf_cache, folder, repo="kmm-test/pickle-only")
        )
    assert "pytorch_model.bin" in str(error.value)
    assert not opened


def test_timm_checkpoint_converts_into_mone(small_checkpoint, hf_cache):
    """MoNE's nested experts are slices of the dense ViT: at
    `capacity_budget=1.0` (the converted default) every token runs at full
    width and the logits are timm's; a lower budget runs the same weights
    on fewer features."""
    reference, folder = small_checkpoint
    handle = publish(hf_cache, folder)
    model = kmm.MoNE.from_preset(handle)
    backbone = model.backbone
    assert backbone.capacity_budget == 1.0
    assert backbone.use_class_token and backbone.mlp_activation == "gelu"
    assert model.pooling == "token" and model.num_classes == 10
    images = raw_images()
    theirs = timm_logits(reference, timm_normalize(images, reference))
    ours = to_numpy(model.predict(images, verbose=0))
    assert np.abs(ours - theirs).max() <= TOLERANCE
    full_flops = kmm.count_flops(model)

    model.capacity_budget = 0.5
    cheaper = to_numpy(model.predict(images, verbose=0))
    assert np.isfinite(cheaper).all()
    assert np.abs(cheaper - theirs).max() > 1e-3  # other tokens, narrower
    assert kmm.count_flops(model) < 0.75 * full_flops

    # The budget as a from_preset override (the router is new, so which
    # tokens go where differs from `model`'s); the backbone alone.
    half = kmm.MoNE.from_preset(handle, capacity_budget=0.5)
    assert half.capacity_budget == 0.5
    assert np.isfinite(to_numpy(half.predict(images, verbose=0))).all()
    features = kmm.MoNEBackbone.from_preset(handle)
    x = timm_normalize(raw_images(8), reference)
    with torch.no_grad():
        expected = reference.forward_features(
            torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        ).numpy()
    got = to_numpy(features(x)["sequence_output"])
    assert np.abs(got - expected).max() <= TOLERANCE


def test_mone_refuses_upcycling_arguments(small_checkpoint, hf_cache):
    _, folder = small_checkpoint
    handle = publish(hf_cache, folder)
    with pytest.raises(ValueError, match="num_experts.*capacity_budget"):
        kmm.MoNE.from_preset(handle, num_experts=4, num_moe_layers=1)
    with pytest.raises(ValueError, match="MobileVMoE"):
        kmm.upcycle(kmm.MoNE.from_preset(handle), num_experts=4)


def test_resample_matches_timm_downsampling():
    from timm.layers import resample_abs_pos_embed

    pe = np.random.RandomState(0).randn(1, 1 + 7 * 7, 8).astype("float32")
    for grid in ((4, 4), (10, 10), (7, 3)):
        theirs = resample_abs_pos_embed(
            torch.from_numpy(pe),
            new_size=grid,
            old_size=(7, 7),
            num_prefix_tokens=1,
        ).numpy()
        ours = common.resample_position_embedding(pe, (7, 7), grid, 1)
        assert np.abs(ours - theirs).max() <= 1e-5


# --- keras-hub ----------------------------------------------------------------


def test_keras_hub_vit_preset_loads_with_keras_hubs_logits(hf_cache, tmp_path):
    import keras_hub

    keras.utils.set_random_seed(3)
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=2,
        num_heads=3,
        hidden_dim=48,
        mlp_dim=96,
    )
    converter = keras_hub.layers.ViTImageConverter(
        image_size=(32, 32), scale=1 / 127.5, offset=-1.0
    )
    preprocessor = keras_hub.models.ViTImageClassifierPreprocessor(converter)
    reference = keras_hub.models.ViTImageClassifier(
        backbone, num_classes=7, preprocessor=preprocessor
    )
    for variable in reference.weights:  # zero-initialised biases and norms
        value = to_numpy(variable)
        variable.assign(
            value
            + np.random.RandomState(0)
            .normal(0, 0.2, value.shape)
            .astype("float32")
        )
    folder = str(tmp_path / "vit")
    reference.save_to_preset(folder)
    handle = publish(hf_cache, folder, repo="keras/vit-tiny-test")
    model = kmm.MobileVMoE.from_preset(handle)
    images = raw_images()
    ours = to_numpy(model.predict(images, verbose=0))
    theirs = to_numpy(reference.predict(images, verbose=0))
    assert np.abs(ours - theirs).max() <= TOLERANCE
    assert theirs.std() > 0.1
    moe = kmm.models.MobileVMoEBackbone.from_preset(
        handle, num_experts=3, num_moe_layers=2
    )
    x = to_numpy(reference.preprocessor(images))
    assert (
        np.abs(
            to_numpy(moe(x)["sequence_output"]) - to_numpy(backbone(x))
        ).max()
        <= TOLERANCE
    )
    # keras-hub's ViT (hidden_dim 48 = 8 x 6) is also a MoNE at budget 1.
    mone = kmm.MoNE.from_preset(handle)
    got = to_numpy(mone.predict(images, verbose=0))
    assert np.abs(got - theirs).max() <= TOLERANCE


# --- the acceptance checkpoint at full size -----------------------------------


@pytest.mark.large
def test_vit_small_patch32_224_full_size(hf_cache, tmp_path):
    """`vit_small_patch32_224` exactly (22M parameters), random weights,
    written by timm; CIFAR-100 images resized to 224 with PIL bicubic."""
    from PIL import Image

    torch.manual_seed(0)
    reference = randomize(timm.create_model("vit_small_patch32_224"))
    folder = str(tmp_path / "s32")
    save_timm_checkpoint(reference, folder)
    model = kmm.MobileVMoE.from_preset(publish(hf_cache, folder))
    assert model.backbone.image_shape == (224, 224, 3)
    assert model.backbone.num_layers == 12 and model.backbone.hidden_dim == 384
    assert model.num_classes == 1000
    images = np.stack(
        [
            np.asarray(Image.fromarray(i).resize((224, 224), Image.BICUBIC))
            for i in raw_images(4)
        ]
    )
    x = timm_normalize(images, reference)
    ours = to_numpy(model(x, training=False))
    theirs = timm_logits(reference, x)
    assert np.abs(ours - theirs).max() <= TOLERANCE
