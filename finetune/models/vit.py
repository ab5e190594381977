"""A small Vision Transformer (Dosovitskiy et al. 2021) for 28x28 / 32x32 images.

Patch embedding (a strided conv) + learned position embeddings + a class token, pre-norm transformer blocks,
final LayerNorm, and a linear head on the class token (or on the mean of the patch tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.errors import FinetuneError
from finetune.models import MODELS
from finetune.models.layers import attend, check_input, conv, layer_norm, linear, numbered_groups, run_blocks


class SelfAttention(nnx.Module):
  def __init__(self, width: int, num_heads: int, dropout: float, rngs: nnx.Rngs):
    if width % num_heads:
      raise FinetuneError(f"config.model.width={width} is not divisible by config.model.num_heads={num_heads}")
    self.num_heads = num_heads
    self.query = linear(width, width, ("embed", "heads"), rngs)
    self.key = linear(width, width, ("embed", "heads"), rngs)
    self.value = linear(width, width, ("embed", "heads"), rngs)
    self.out = linear(width, width, ("heads", "embed"), rngs)
    self.dropout = nnx.Dropout(dropout)
    self.prefix = None  # prefix tuning sets trainable keys/values here

  def __call__(self, x: jax.Array, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    batch, length, width = x.shape
    head_dim = width // self.num_heads

    def split_heads(y):  # (B, L, heads*head_dim) -> (B, L, heads, head_dim)
      return y.reshape(batch, length, self.num_heads, head_dim)

    q, k, v = split_heads(self.query(x)), split_heads(self.key(x)), split_heads(self.value(x))
    attended = attend(q, k, v, None, self.dropout, train, rngs, self.prefix).reshape(batch, length, width)
    return self.out(attended)


class Block(nnx.Module):
  def __init__(self, width: int, num_heads: int, mlp_dim: int, dropout: float, eps: float, rngs: nnx.Rngs):
    self.attention_norm = layer_norm(width, rngs, eps)
    self.attention = SelfAttention(width, num_heads, dropout, rngs)
    self.mlp_norm = layer_norm(width, rngs, eps)
    self.mlp_in = linear(width, mlp_dim, ("embed", "mlp"), rngs)
    self.mlp_out = linear(mlp_dim, width, ("mlp", "embed"), rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x: jax.Array, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    x = x + self.dropout(self.attention(self.attention_norm(x), train, rngs), deterministic=not train, rngs=rngs)
    hidden = jax.nn.gelu(self.mlp_in(self.mlp_norm(x)), approximate=False)  # exact GELU, as ViT checkpoints use
    return x + self.dropout(self.mlp_out(hidden), deterministic=not train, rngs=rngs)


@MODELS.register("vit")
class ViT(nnx.Module):
  """Patches -> [class token; patch tokens] + positions -> blocks -> LayerNorm -> head."""

  scan_blocks = "blocks"  # the stack of identical blocks that config.train.scan_layers stacks

  def __init__(self, *, num_classes: int, image_size: int = 28, in_channels: int = 1, patch_size: int = 7,
               width: int = 64, depth: int = 4, num_heads: int = 4, mlp_dim: int = 128, dropout: float = 0.0,
               pool: str = "cls", layer_norm_eps: float = 1e-6, pixel_mean: tuple[float, ...] = (),
               pixel_std: tuple[float, ...] = (), hf_config: str = "", rngs: nnx.Rngs):
    del hf_config  # read by finetune.models.hf before construction
    if image_size % patch_size:
      raise FinetuneError(f"config.model.image_size={image_size} is not divisible by "
                          f"config.model.patch_size={patch_size}")
    if pool not in ("cls", "mean"):
      raise FinetuneError(f"config.model.pool={pool!r}; valid: 'cls', 'mean'")
    self.pool, self.input_shape = pool, (image_size, image_size, in_channels)
    # A pretrained ViT saw images normalised by its image processor ((x - mean) / std per channel, from
    # preprocessor_config.json; google/vit-* use 0.5 / 0.5, so [-1, 1]); the pipeline gives [0, 1]. Applied here,
    # in the model, so every pipeline, eval and export sees the same function. Empty: no normalisation.
    if len(pixel_mean) != len(pixel_std) or len(pixel_mean) not in (0, 1, in_channels):
      raise FinetuneError(f"config.model.pixel_mean={tuple(pixel_mean)} and pixel_std={tuple(pixel_std)} must both "
                          f"be empty, one value, or one value per channel ({in_channels})")
    if any(value <= 0 for value in pixel_std):
      raise FinetuneError(f"config.model.pixel_std={tuple(pixel_std)} must be positive")
    self.pixel_mean, self.pixel_std = tuple(float(v) for v in pixel_mean), tuple(float(v) for v in pixel_std)
    num_patches = (image_size // patch_size) ** 2
    self.patch_embed = conv(in_channels, width, (patch_size, patch_size), rngs, strides=patch_size, padding="VALID")
    self.cls_token = nnx.Param(jnp.zeros((1, 1, width)), sharding=(None, None, "embed"))
    position_init = nnx.initializers.normal(stddev=0.02)
    self.position_embedding = nnx.Param(position_init(rngs.params(), (1, num_patches + 1, width)),
                                        sharding=(None, "position", "embed"))
    # After the position embeddings, as transformers' ViTEmbeddings and big_vision apply it (it was missing).
    self.embed_dropout = nnx.Dropout(dropout)
    self.blocks = nnx.List([Block(width, num_heads, mlp_dim, dropout, layer_norm_eps, rngs) for _ in range(depth)])
    self.norm = layer_norm(width, rngs, layer_norm_eps)
    self.head = linear(width, num_classes, ("embed", "classes"), rngs, kernel_init=nnx.initializers.zeros_init())

  def embed(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    check_input(x, self.input_shape, "config.model.image_size, in_channels; from hf_config when it is set")
    if self.pixel_mean:  # (static Python floats, so no parameters and nothing a strategy must cover)
      x = (x - jnp.asarray(self.pixel_mean, x.dtype)) / jnp.asarray(self.pixel_std, x.dtype)
    patches = self.patch_embed(x)  # (B, H/p, W/p, width)
    batch, _, _, width = patches.shape
    tokens = patches.reshape(batch, -1, width)  # (B, H/p, W/p, width) -> (B, num_patches, width)
    cls = jnp.broadcast_to(self.cls_token[...], (batch, 1, width))
    tokens = jnp.concatenate([cls, tokens], axis=1) + self.position_embedding[...]
    tokens = self.embed_dropout(tokens, deterministic=not train, rngs=rngs)
    tokens = run_blocks(self, self.blocks, tokens, train, rngs)
    tokens = self.norm(tokens)
    return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(axis=1)

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    return self.head(self.embed(x, train=train, rngs=rngs)).astype(jnp.float32)

  def layer_groups(self) -> list[tuple[str, str]]:
    # The final LayerNorm belongs to the last block's group: it shapes the features the head reads, and a linear
    # probe (everything but `head` frozen) keeps it fixed.
    groups = numbered_groups("blocks", len(self.blocks), "block")
    last_name, last_regex = groups[-1]
    groups[-1] = (last_name, f"{last_regex}|^norm/")
    return [("embedding", r"^(patch_embed|cls_token|position_embedding)/?")] + groups + [("head", r"^head/")]
