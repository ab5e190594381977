"""Layers with logical axis names on every parameter.

Logical names used across the zoo: 'embed' (model width), 'mlp' (MLP hidden width), 'heads' (attention heads x
head dim, fused), 'conv_in' / 'conv_out' (convolution channels), 'classes' (classifier outputs), 'norm' (norm
scales/biases), 'patch' / 'position' (ViT positions). `finetune.sharding` maps them to mesh axes; model code never
names a mesh axis.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

LogicalAxes = tuple[str | None, ...]


def linear(in_features: int, out_features: int, axes: tuple[str, str], rngs: nnx.Rngs,
           use_bias: bool = True, kernel_init=nnx.initializers.lecun_normal()) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, use_bias=use_bias, rngs=rngs,
                    kernel_init=nnx.with_partitioning(kernel_init, axes),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)))


def conv(in_features: int, out_features: int, kernel_size: Sequence[int], rngs: nnx.Rngs,
         strides: int | Sequence[int] = 1, padding: str = "SAME", use_bias: bool = True) -> nnx.Conv:
  return nnx.Conv(in_features, out_features, tuple(kernel_size), strides=strides, padding=padding,
                  use_bias=use_bias, rngs=rngs,
                  kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                    (None,) * len(kernel_size) + ("conv_in", "conv_out")),
                  bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)))


def batch_norm(features: int, rngs: nnx.Rngs, axis_name: str = "conv_out") -> nnx.BatchNorm:
  return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs,
                       scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), (axis_name,)),
                       bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axis_name,)))


def normalize(norm: nnx.BatchNorm, x, train: bool):
  """Applies BatchNorm: batch statistics when training, running statistics otherwise or when the strategy froze
  this layer (`finetune.step.inference_mode_batch_norm` sets `use_running_average` on it). Models call this
  rather than `norm(x, use_running_average=...)`, which would override the frozen flag."""
  return norm(x, use_running_average=not train or norm.use_running_average)


def layer_norm(features: int, rngs: nnx.Rngs, eps: float = 1e-6) -> nnx.LayerNorm:
  return nnx.LayerNorm(features, epsilon=eps, rngs=rngs,
                       scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                       bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)))


def numbered_groups(prefix: str, count: int, group_prefix: str) -> list[tuple[str, str]]:
  """[('block_1', '^blocks/0/'), ...]: one layer group per element of a numbered sub-module list."""
  return [(f"{group_prefix}_{i + 1}", rf"^{prefix}/{i}/") for i in range(count)]


def transformer_dense(in_features: int, out_features: int, axes: tuple[str, str], rngs: nnx.Rngs,
                      use_bias: bool = True) -> nnx.Linear:
  """A Linear initialised as the transformer checkpoints we load are (normal, std 0.02)."""
  return linear(in_features, out_features, axes, rngs, use_bias=use_bias,
                kernel_init=nnx.initializers.normal(0.02))


def padding_bias(attention_mask: jax.Array, dtype) -> jax.Array:
  """(B, L) 0/1 mask -> (B, 1, 1, L) additive bias: masked keys get the most negative float, as transformers does."""
  return jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(dtype).min).astype(dtype)


def causal_bias(attention_mask: jax.Array, dtype) -> jax.Array:
  """(B, L) 0/1 mask -> (B, 1, L, L) additive bias allowing each position its unmasked past and itself."""
  length = attention_mask.shape[1]
  allowed = jnp.tril(jnp.ones((length, length), bool))[None, None] & (attention_mask[:, None, None, :] > 0)
  return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None,
           dropout: nnx.Dropout | None = None, train: bool = False, rngs: nnx.Rngs | None = None,
           prefix: nnx.Module | None = None) -> jax.Array:
  """Scaled dot-product attention over (B, L, heads, head_dim) queries/keys/values -> (B, L, heads, head_dim).

  `prefix` (prefix tuning, `finetune/methods/prefix_tuning.py`) holds trainable keys and values that every query
  may attend to, prepended to k and v; attention modules keep it as their `prefix` attribute (None otherwise).
  """
  if prefix is not None:
    k, v, bias = prefix.extend(k, v, bias)
  scores = jnp.einsum("blhd,bmhd->bhlm", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
  if bias is not None:
    scores = scores + bias
  weights = jax.nn.softmax(scores, axis=-1)
  if dropout is not None:
    weights = dropout(weights, deterministic=not train, rngs=rngs)
  return jnp.einsum("bhlm,bmhd->blhd", weights, v)


# Rematerialisation policies for `run_block` (config.train.remat): what a block keeps for the backward pass.
REMAT_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,  # only the block's input; recompute everything inside
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute the rest
}


def run_block(owner: nnx.Module, block: nnx.Module, *args):
  """`block(*args)`, rematerialised per block when the model's `remat` attribute names a policy (set from
  config.train.remat): activations inside the block are recomputed in the backward pass instead of stored, so
  activation memory grows with the number of blocks by one block input each. Python values among `args` (the
  `train` flag, a missing `rngs`) are static."""
  policy = getattr(owner, "remat", "")
  if not policy:
    return block(*args)
  static = tuple(i + 1 for i, a in enumerate(args) if isinstance(a, bool) or a is None)
  return nnx.remat(lambda module, *inputs: module(*inputs), policy=REMAT_POLICIES[policy],
                   static_argnums=static)(block, *args)
