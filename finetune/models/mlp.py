"""A multi-layer perceptron on flattened inputs: the smallest model with layer groups, for tests and baselines."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.models import MODELS
from finetune.models.layers import check_input, linear, numbered_groups


@MODELS.register("mlp")
class MLP(nnx.Module):
  """Flatten -> [Linear -> ReLU -> Dropout] x len(hidden) -> head."""

  def __init__(self, *, num_classes: int, input_size: int = 784, hidden: tuple[int, ...] = (256, 256),
               dropout: float = 0.0, rngs: nnx.Rngs):
    sizes, self.input_size = (input_size, *hidden), input_size
    # Consecutive layers alternate their axes (Megatron's column- then row-parallel pair): a layer's output is
    # sharded as the next one's input, so no activation is regathered in between. (It also avoids an XLA bug of jax
    # 0.10: chains of three matmuls whose weights are all sharded (fsdp, tensor) got wrong gradients on a data x
    # fsdp x tensor mesh; see docs/architecture.md, "Sharding".)
    axes = [("embed", "mlp") if i % 2 == 0 else ("mlp", "embed") for i in range(len(hidden))]
    self.layers = nnx.List([linear(a, b, layer_axes, rngs)
                            for a, b, layer_axes in zip(sizes[:-1], sizes[1:], axes)])
    self.dropout = nnx.Dropout(dropout)
    self.head = linear(sizes[-1], num_classes, (axes[-1][1] if axes else "embed", "classes"), rngs)

  def embed(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    check_input(x, (self.input_size,), "config.model.input_size: values per example", flattened=True)
    x = x.reshape(x.shape[0], -1)  # (B, H, W, C) -> (B, H*W*C)
    for layer in self.layers:
      x = self.dropout(jax.nn.relu(layer(x)), deterministic=not train, rngs=rngs)
    return x

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    return self.head(self.embed(x, train=train, rngs=rngs)).astype(jnp.float32)

  def layer_groups(self) -> list[tuple[str, str]]:
    return numbered_groups("layers", len(self.layers), "layer") + [("head", r"^head/")]
