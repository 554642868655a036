"""Training recipes for CIFAR-100 (used by `training/train.py`).

Two named recipes, after the paper's setup (Daxberger et al., "Mobile V-MoEs",
arXiv 2309.04354, Sec. 4 / App. A: DeiT-style training for the larger widths,
a lighter ViT recipe for the small ones):

- `deit`: Touvron et al., "Training data-efficient image transformers"
  (DeiT, arXiv 2012.12877), Table 9: AdamW (lr 5e-4 x batch/512, weight decay
  0.05), cosine decay with 5 warm-up epochs, label smoothing 0.1,
  RandAugment (2 ops, magnitude 9/10), Mixup 0.8 / CutMix 1.0 (one of the two
  per batch, p=0.5 each), random erasing 0.25, stochastic depth 0.1.
- `vit`: a lighter recipe for widths 96 and 64 (small models under-fit with
  DeiT's heavy regularisation): AdamW (lr 1e-3 x batch/512, weight decay
  0.05), cosine with warm-up, label smoothing 0.1, random crop (pad 4) and
  horizontal flip only, no stochastic depth.
- `auto`: `deit` for widths >= 192, `vit` below.

Warm-up is 5 epochs, capped at 10% of the run so short runs still decay.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    base_learning_rate: float  # at batch size 512; scaled linearly
    weight_decay: float
    warmup_epochs: float
    min_learning_rate: float
    label_smoothing: float
    random_crop_padding: int
    horizontal_flip: bool
    rand_augment_ops: int  # 0: off
    rand_augment_factor: float  # magnitude in [0, 1] (DeiT m9 of 10 -> 0.9)
    mixup_alpha: float  # 0: off
    cutmix_alpha: float  # 0: off
    random_erasing: float  # probability, 0: off
    drop_path_rate: float
    dropout: float = 0.0
    clipnorm: float | None = 1.0

    def learning_rate(self, batch_size):
        return self.base_learning_rate * batch_size / 512.0

    def warmup(self, epochs):
        return min(self.warmup_epochs, 0.1 * epochs)

    @property
    def soft_labels(self):
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def as_dict(self):
        return dataclasses.asdict(self)


RECIPES = {
    "deit": Recipe(
        name="deit",
        base_learning_rate=5e-4,
        weight_decay=0.05,
        warmup_epochs=5,
        min_learning_rate=1e-5,
        label_smoothing=0.1,
        random_crop_padding=4,
        horizontal_flip=True,
        rand_augment_ops=2,
        rand_augment_factor=0.9,
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        random_erasing=0.25,
        drop_path_rate=0.1,
    ),
    "vit": Recipe(
        name="vit",
        base_learning_rate=1e-3,
        weight_decay=0.05,
        warmup_epochs=5,
        min_learning_rate=1e-5,
        label_smoothing=0.1,
        random_crop_padding=4,
        horizontal_flip=True,
        rand_augment_ops=0,
        rand_augment_factor=0.0,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        random_erasing=0.0,
        drop_path_rate=0.0,
    ),
}


def get_recipe(name, hidden_dim):
    """Returns the `Recipe` called `name` (`"auto"`: by the model width)."""
    if name == "auto":
        name = "deit" if hidden_dim >= 192 else "vit"
    if name not in RECIPES:
        raise ValueError(
            f"Received: recipe={name!r}. Accepted: 'auto', "
            + ", ".join(repr(r) for r in RECIPES)
            + "."
        )
    return RECIPES[name]
