import keras
from keras import ops

from keras_mobile_moe.layers.xla_cpu import on_xla_cpu
from keras_mobile_moe.validation import check_int


def _chunk_size(batch):
    """The largest divisor of a static `batch` that is at most 8 and smaller
    than `batch` (1 when there is none, or the batch size is unknown)."""
    if not isinstance(batch, int) or batch <= 8:
        return 1
    return max(c for c in range(1, 9) if batch % c == 0)


@keras.saving.register_keras_serializable(package="keras_mobile_moe")
class PatchEmbedding(keras.layers.Layer):
    """Cuts an image into patches, embeds them and adds positions.

    Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021. The
    patches are embedded with one strided convolution (the same FLOPs as a
    linear layer on flattened patches), an optional learned class token is
    prepended, and a learned position embedding is added.

    Args:
        hidden_dim: int. Width of the token embeddings.
        patch_size: int. Side of the square patches; must divide the image
            height and width.
        use_class_token: bool. Whether to prepend a learned class token.

    Call arguments:
        inputs: float tensor `[batch, height, width, channels]`.

    Returns:
        Tokens `[batch, num_patches (+ 1), hidden_dim]`.

    Example:

    >>> import numpy as np
    >>> layer = PatchEmbedding(hidden_dim=16, patch_size=8)
    >>> tuple(layer(np.zeros((2, 32, 32, 3))).shape)
    (2, 17, 16)
    """

    def __init__(self, hidden_dim, patch_size, use_class_token=True, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = check_int("hidden_dim", hidden_dim, minimum=1)
        self.patch_size = check_int("patch_size", patch_size, minimum=1)
        self.use_class_token = bool(use_class_token)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                "PatchEmbedding expects images of rank 4 "
                f"[batch, height, width, channels]. Received: "
                f"input_shape={tuple(input_shape)}."
            )
        height, width = input_shape[1], input_shape[2]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by "
                f"patch_size={self.patch_size}. Accepted: a patch_size that "
                "divides both the image height and width."
            )
        self.image_shape = tuple(input_shape[1:])
        self.num_patches = (height // self.patch_size) * (
            width // self.patch_size
        )
        self.projection = keras.layers.Conv2D(
            self.hidden_dim,
            kernel_size=self.patch_size,
            strides=self.patch_size,
            padding="valid",
            # Images are [batch, height, width, channels] whatever
            # keras.config.image_data_format() says (the backbones refuse
            # "channels_first"); the kernel is read directly in `_project`.
            data_format="channels_last",
            dtype=self.dtype_policy,
            name="projection",
        )
        self.projection.build(input_shape)
        if self.use_class_token:
            self.class_token = self.add_weight(
                shape=(1, 1, self.hidden_dim),
                initializer="zeros",
                name="class_token",
            )
        num_tokens = self.num_patches + int(self.use_class_token)
        self.position_embedding = self.add_weight(
            shape=(1, num_tokens, self.hidden_dim),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            name="position_embedding",
        )
        self.built = True

    def call(self, inputs):
        if tuple(inputs.shape[1:]) != self.image_shape:
            raise ValueError(
                "Expected images of shape [batch, "
                f"{', '.join(map(str, self.image_shape))}]. Received: images "
                f"of shape {tuple(inputs.shape)}."
            )
        # The strided convolution as reshape + matmul (same weights): on
        # XLA:CPU this is ~3x faster at patch 32 than the convolution.
        batch = inputs.shape[0]
        chunk = _chunk_size(batch)
        if on_xla_cpu() and chunk > 1:
            # XLA:CPU rearranges a whole batch of 224x224 images into patches
            # ~3x slower than it does a few images at a time (cache-sized
            # pieces); at 49 tokens that copy was ~30% of a dense ViT's time.
            # Accelerators do the whole batch at once.
            height, width, channels = self.image_shape
            chunks = ops.reshape(
                inputs, (batch // chunk, chunk, height, width, channels)
            )
            tokens = ops.map(self._project, chunks)
            tokens = ops.reshape(
                tokens, (batch, self.num_patches, self.hidden_dim)
            )
        else:
            tokens = self._project(inputs)
        if self.use_class_token:
            class_token = ops.broadcast_to(
                ops.cast(self.class_token, tokens.dtype),
                (ops.shape(tokens)[0], 1, self.hidden_dim),
            )
            tokens = ops.concatenate([class_token, tokens], axis=1)
        return tokens + ops.cast(self.position_embedding, tokens.dtype)

    def _project(self, images):
        """Patches of `images` `[n, H, W, C]` times the kernel: `[n, P, D]`."""
        p = self.patch_size
        height, width, channels = self.image_shape
        patches = ops.reshape(
            images, (-1, height // p, p, width // p, p, channels)
        )
        patches = ops.transpose(patches, (0, 1, 3, 2, 4, 5))
        patches = ops.reshape(patches, (-1, self.num_patches, p * p * channels))
        kernel = ops.reshape(self.projection.kernel, (p * p * channels, -1))
        tokens = ops.matmul(patches, ops.cast(kernel, patches.dtype))
        return tokens + ops.cast(self.projection.bias, tokens.dtype)

    def compute_output_shape(self, input_shape):
        num_patches = (input_shape[1] // self.patch_size) * (
            input_shape[2] // self.patch_size
        )
        num_tokens = num_patches + int(self.use_class_token)
        return (input_shape[0], num_tokens, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "patch_size": self.patch_size,
                "use_class_token": self.use_class_token,
            }
        )
        return config
