"""(IA)^3 (Liu et al. 2022, "Few-shot parameter-efficient fine-tuning is better and cheaper than in-context
learning"): learned vectors that rescale activations, initialised to ones (the adapted model equals the base).

As in PEFT's IA3: a layer in `config.peft.targets` that is not in `config.peft.feedforward` has its output scaled,
y = (x W + b) * l with l: (out,) (keys and values in the paper); a layer also in `feedforward` has its input scaled,
y = (x * l) W + b with l: (in,) (the FFN's second projection). Both fold into W exactly, so IA3 runs merge.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from finetune import adapters
from finetune.errors import FinetuneError


class IA3Linear(nnx.Module):
  def __init__(self, base: nnx.Linear, feedforward: bool):
    self.kernel, self.bias, self.feedforward = base.kernel, base.bias, feedforward
    axes = adapters.logical_axes_of(base.kernel)
    size = base.in_features if feedforward else base.out_features
    self.ia3_scale = nnx.Param(jnp.ones((size,), base.kernel.get_value().dtype),
                               sharding=(axes[0] if feedforward else axes[1],))

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.feedforward:
      x = x * self.ia3_scale[...]
    y = x @ self.kernel[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y if self.feedforward else y * self.ia3_scale[...]


def _is_feedforward(peft_cfg: ConfigDict, path: str) -> bool:
  name = path.rsplit("/", 1)[-1]
  return any(name == f if re.fullmatch(r"\w+", f) else re.search(f, path) for f in peft_cfg.feedforward)


def inject(model: nnx.Module, peft_cfg: ConfigDict, rngs: nnx.Rngs) -> None:
  del rngs  # ones: nothing random
  chosen = adapters.select_modules(model, peft_cfg.targets, exclude=adapters.saved_modules(peft_cfg))
  if peft_cfg.feedforward:
    feedforward = adapters.select_modules(model, peft_cfg.feedforward, "config.peft.feedforward",  # each matches
                                          exclude=adapters.saved_modules(peft_cfg))
    # As PEFT's IA3Config: feedforward layers are a subset of the targets (else they would silently get no vector).
    left_out = sorted({path for path, _ in feedforward} - {path for path, _ in chosen})
    if left_out:
      raise FinetuneError(f"config.peft.feedforward names {left_out[0]}"
                          f"{f' (and {len(left_out) - 1} more)' if len(left_out) > 1 else ''}, which "
                          "config.peft.targets does not adapt; feedforward layers must also be targets (add them "
                          "to config.peft.targets)")
  for path, module in chosen:
    adapters.replace_module(model, path, IA3Linear(module, _is_feedforward(peft_cfg, path)))


def _fold(layers: list[tuple[str, IA3Linear]], params: dict[str, Any], as_array: Callable) -> dict[str, Any]:
  """Each IA3 layer's kernel (and, when its output is scaled, bias) as its vector scales it, the vector dropped.
  `as_array` converts each operand (numpy for `merge`, float32 jax arrays inside the train step)."""
  params = dict(params)
  for path, module in layers:
    scale = as_array(params.pop(f"{path}/ia3_scale"))
    kernel = as_array(params[f"{path}/kernel"])
    if module.feedforward:  # (x * l) W = x (diag(l) W): scale the kernel's rows
      params[f"{path}/kernel"] = kernel * scale[:, None]
    else:  # (x W + b) * l: scale the kernel's columns and the bias
      params[f"{path}/kernel"] = kernel * scale[None, :]
      if f"{path}/bias" in params:
        params[f"{path}/bias"] = as_array(params[f"{path}/bias"]) * scale
  return params


def merge(abstract_model: nnx.Module, params: dict, model_state: dict) -> tuple[dict, dict]:
  params = {p: np.asarray(v) for p, v in params.items()}
  return _fold(list(adapters.module_paths(abstract_model, IA3Linear)), params, np.asarray), model_state


def effective(abstract_model: nnx.Module) -> Callable[[dict[str, Any]], dict[str, Any]]:
  """`merge` as a traceable function of the flat params, for EWC and L2-SP inside the train step. Without it the
  penalties saw only the frozen kernels, and IA3 over a trained model could not be regularized."""
  layers = list(adapters.module_paths(abstract_model, IA3Linear))
  return lambda params: _fold(layers, params, lambda value: value.astype(jnp.float32))


adapters.PEFT_METHODS.register("ia3")(adapters.PeftMethod(inject=inject, merge=merge, effective=effective,
                                                          settings=("feedforward",)))
