"""Bottleneck adapters (Houlsby et al. 2019): after each targeted layer, h + up(gelu(down(h))).

Houlsby et al. insert two adapters per transformer layer, after the attention output projection and after the
feed-forward output projection, before the residual sum and LayerNorm: for BERT that is
`targets=('attention/output$', 'layers/\\d+/output$')`; they also train the LayerNorms
(`modules_to_save=('norm/',)`). `down` is (width, bottleneck_size), `up` (bottleneck_size, width) starts at zero, so
the adapted model equals the base at step 0. The adapter adds computation no plain model has: it cannot merge.

One difference from Houlsby's code (google-research/adapter-bert) and AdapterHub: there the adapter reads the
projection after the sub-layer's dropout; here it wraps the projection (a replaced Linear, so no model knows about
adapters), so it sits before that dropout: in training it reads the undropped projection and its output is dropped
with it. At evaluation (no dropout) the two are the same function; with dropout 0 they are the same in training too.
"""

from __future__ import annotations

import jax
from flax import nnx
from ml_collections import ConfigDict

from finetune import adapters
from finetune.models.layers import linear


class BottleneckAdapter(nnx.Module):
  def __init__(self, base: nnx.Linear, size: int, rngs: nnx.Rngs):
    self.kernel, self.bias = base.kernel, base.bias
    width = base.out_features
    axes = adapters.logical_axes_of(base.kernel)
    # Near-identity start: a small random projection down, zeros up.
    self.adapter_down = linear(width, size, (axes[1], None), rngs, kernel_init=nnx.initializers.normal(1e-2))
    self.adapter_up = linear(size, width, (None, axes[1]), rngs, kernel_init=nnx.initializers.zeros_init())

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x @ self.kernel[...]
    if self.bias is not None:
      h = h + self.bias[...]
    return h + self.adapter_up(jax.nn.gelu(self.adapter_down(h)))


def inject(model: nnx.Module, peft_cfg: ConfigDict, rngs: nnx.Rngs) -> None:
  for path, module in adapters.select_modules(model, peft_cfg.targets, exclude=adapters.saved_modules(peft_cfg)):
    adapters.replace_module(model, path, BottleneckAdapter(module, peft_cfg.bottleneck_size, rngs))


adapters.PEFT_METHODS.register("bottleneck")(adapters.PeftMethod(inject=inject, settings=("bottleneck_size",)))
