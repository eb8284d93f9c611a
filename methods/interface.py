"""What a method and the generic patch agree on: the attention features a method may ask for at
a reduction location, where in a block it reduces, and the shape of the model it reduces.

The tensors they exchange (:class:`~ppt_bench.methods.ops.Features` in,
:class:`~ppt_bench.methods.ops.Reduced` out) are in :mod:`ppt_bench.methods.ops`.
"""

from __future__ import annotations

from dataclasses import dataclass

# What a method can ask the patch for at a reduction location.
CLS_ATTN = "cls_attn"  # class-token attention row, [B, H, N]
KEY_MEAN = "key_mean"  # keys averaged over heads, [B, N, d]
VALUE_NORM = "value_norm"  # L2 norm of each token's value vector, [B, N]
ATTN = "attn"  # the full post-softmax attention map, [B, H, N, N]
FEATURES = frozenset({CLS_ATTN, KEY_MEAN, VALUE_NORM, ATTN})

# Where in a block a method reduces tokens (``Method.reduce_at``).
AFTER_ATTN = "after_attn"  # after the attention residual, before the MLP (ALGORITHMS.md)
IN_ATTN = "in_attn"  # inside the attention: on the block input, with the attention map
AFTER_MLP = "after_mlp"  # after the MLP residual, on the block output
REDUCE_POINTS = (AFTER_ATTN, IN_ATTN, AFTER_MLP)


@dataclass(frozen=True)
class ViTInfo:
    """The shape of a patchable ViT: what a method needs to know to check that it fits.

    Args:
        name: model name.
        depth: transformer blocks.
        embed_dim: channels per token.
        patch_tokens: patch tokens at the default input size.
        prefix_tokens: class, distillation and register tokens.
        class_token: whether one of them is a class token (methods that rank tokens by its
            attention need one).
    """

    name: str
    depth: int
    embed_dim: int
    patch_tokens: int
    prefix_tokens: int
    class_token: bool = True
