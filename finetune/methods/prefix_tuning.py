"""Prefix tuning (Li & Liang 2021): trainable keys and values, `num_virtual_tokens` per attention layer, that every
query may attend to; the model's own weights stay frozen.

Each attention module of the zoo has a `prefix` slot that `layers.attend` reads: the prefix keys/values are
prepended to the (already rotary-embedded) keys and values, and the attention bias gets n unmasked columns in front.
Prefixes are stored per query head (for Llama with grouped-query attention that is more parameters than PEFT,
which stores them per key/value head). Li & Liang reparameterise the prefix through an MLP during training for
stability; this is the direct parameterisation (PEFT's `prefix_projection=False`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from finetune import adapters
from finetune.errors import FinetuneError


class Prefix(nnx.Module):
  def __init__(self, num_tokens: int, heads: int, head_dim: int, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.prefix_keys = nnx.Param(init(rngs.params(), (num_tokens, heads, head_dim)), sharding=(None, "heads", None))
    self.prefix_values = nnx.Param(init(rngs.params(), (num_tokens, heads, head_dim)),
                                   sharding=(None, "heads", None))

  def extend(self, k: jax.Array, v: jax.Array, bias: jax.Array | None):
    """k, v: (B, L, heads, d) -> (B, n + L, heads, d); bias (B, 1, Lq, L) -> (B, 1, Lq, n + L)."""
    batch, count = k.shape[0], self.prefix_keys.shape[0]
    keys = jnp.broadcast_to(self.prefix_keys[...].astype(k.dtype), (batch, *self.prefix_keys.shape))
    values = jnp.broadcast_to(self.prefix_values[...].astype(v.dtype), (batch, *self.prefix_values.shape))
    if bias is not None:
      bias = jnp.pad(bias, [(0, 0)] * (bias.ndim - 1) + [(count, 0)])  # prefix positions: never masked
    return jnp.concatenate([keys, k], axis=1), jnp.concatenate([values, v], axis=1), bias


def _heads(module: nnx.Module) -> tuple[int, int]:
  """(query heads, head dim) of an attention module of the zoo."""
  heads = getattr(module, "num_heads")
  if getattr(module, "head_dim", None):
    return heads, module.head_dim
  for name in ("query", "c_attn", "q_proj"):
    layer = getattr(module, name, None)
    if layer is not None:
      width = layer.kernel.get_value().shape[1] // (3 if name == "c_attn" else 1)
      return heads, width // heads
  raise FinetuneError(f"cannot tell the head size of {type(module).__name__}")


def inject(model: nnx.Module, peft_cfg: ConfigDict, rngs: nnx.Rngs) -> None:
  slots = [(path, node) for path, node in adapters.module_paths(model, nnx.Module) if hasattr(node, "prefix")
           and not isinstance(node, Prefix)]
  if not slots:
    raise FinetuneError(f"model {type(model).__name__} has no attention layers with a prefix slot; prefix tuning "
                        "needs a transformer (bert, gpt2, llama, vit): choose one, or another PEFT method")
  for _, node in slots:
    heads, head_dim = _heads(node)
    node.prefix = nnx.data(Prefix(peft_cfg.num_virtual_tokens, heads, head_dim, rngs))  # the slot was None


adapters.PEFT_METHODS.register("prefix")(adapters.PeftMethod(inject=inject, settings=("num_virtual_tokens",),
                                                              targets="ignored"))
