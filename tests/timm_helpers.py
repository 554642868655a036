"""Imports timm for the conversion tests, and writes timm checkpoints into a
real Hugging Face cache.

timm imports torchvision. The torchvision wheel paired with torch 2.13.0
(0.28.0, pinned in pyproject.toml's dev extra) is built against CUDA torch:
its compiled operators (nms, roi_align, ...) do not load next to the CPU
torch wheel, and `import torchvision` then fails while registering fake
kernels for `torchvision::nms` / `torchvision::qnms`, which do not exist.
`import_timm` declares those two operator schemas (without kernels) before
importing, so torchvision and timm import; no torchvision operator is ever
called: timm's VisionTransformer uses only torch.
"""

import sys

_LIBRARY = []


def import_timm():
    """Returns the `timm` module (skips nothing: fails if it is missing)."""
    try:
        import timm
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
        for name in list(sys.modules):
            if name.split(".")[0] in ("torchvision", "timm"):
                del sys.modules[name]
        import torch

        library = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            library.define(
                f"{op}(Tensor dets, Tensor scores, float iou_threshold)"
                " -> Tensor"
            )
        _LIBRARY.append(library)  # the definitions live as long as this
        import timm
    return timm


def save_timm_checkpoint(
    model, folder, model_args=None, formats=("safetensors",)
):
    """Writes `model` with timm's own Hub-saving code (`save_for_hf`), as
    timm's `push_to_hf_hub` does before uploading: config.json and
    model.safetensors (and/or the pickle pytorch_model.bin)."""
    from timm.models import save_for_hf

    safe = {("safetensors",): True, ("bin",): False}.get(tuple(formats), "both")
    save_for_hf(model, folder, model_args=model_args, safe_serialization=safe)
    return folder


def timm_logits(model, images):
    """timm's forward pass on NHWC float images, as numpy logits."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        return model.eval()(x).numpy()
