"""A small VGG-style CNN with BatchNorm, in stages: the workhorse of the MNIST/CIFAR transfer experiments.

Each stage is `blocks_per_stage` x (3x3 conv -> BatchNorm -> ReLU) followed by 2x2 max-pooling; after the last
stage, global average pooling and the head. Its layer groups (stem, stage_1..n, head) are the units that
Yosinski-style experiments freeze or transfer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.models import MODELS
from finetune.models.layers import batch_norm, check_input, conv, linear, normalize, numbered_groups, run_block


class ConvBlock(nnx.Module):
  def __init__(self, in_channels: int, out_channels: int, rngs: nnx.Rngs):
    self.conv = conv(in_channels, out_channels, (3, 3), rngs, use_bias=False)  # BatchNorm supplies the bias.
    self.norm = batch_norm(out_channels, rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return jax.nn.relu(normalize(self.norm, self.conv(x), train))


class Stage(nnx.Module):
  def __init__(self, in_channels: int, out_channels: int, num_blocks: int, rngs: nnx.Rngs):
    channels = [in_channels] + [out_channels] * num_blocks
    self.blocks = nnx.List([ConvBlock(a, b, rngs) for a, b in zip(channels[:-1], channels[1:])])

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for block in self.blocks:
      x = block(x, train)
    return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))


@MODELS.register("cnn")
class CNN(nnx.Module):
  """stem -> stages -> global average pool -> dropout -> head."""

  def __init__(self, *, num_classes: int, in_channels: int = 1, stem_width: int = 32,
               widths: tuple[int, ...] = (32, 64), blocks_per_stage: int = 1, dropout: float = 0.0,
               rngs: nnx.Rngs):
    self.stem, self.in_channels = ConvBlock(in_channels, stem_width, rngs), in_channels
    channels = (stem_width, *widths)
    self.stages = nnx.List([Stage(a, b, blocks_per_stage, rngs) for a, b in zip(channels[:-1], channels[1:])])
    self.dropout = nnx.Dropout(dropout)
    self.head = linear(channels[-1], num_classes, ("conv_out", "classes"), rngs)

  def embed(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    check_input(x, (*x.shape[1:-1], self.in_channels), "config.model.in_channels")
    x = self.stem(x, train)
    for stage in self.stages:
      x = run_block(self, stage, x, train)
    x = x.mean(axis=(1, 2))  # (B, H, W, C) -> (B, C)
    return self.dropout(x, deterministic=not train, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    return self.head(self.embed(x, train=train, rngs=rngs)).astype(jnp.float32)

  def layer_groups(self) -> list[tuple[str, str]]:
    return [("stem", r"^stem/")] + numbered_groups("stages", len(self.stages), "stage") + [("head", r"^head/")]
