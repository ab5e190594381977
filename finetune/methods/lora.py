"""LoRA (Hu et al. 2021) and its family as one adapted dense layer: rsLoRA, DoRA, LoRA+ and QLoRA are options.

A targeted `nnx.Linear` (kernel W: (in, out)) becomes a `LoRALinear` that keeps `kernel` and `bias` at the same
parameter paths and adds `lora_a` (in, r) and `lora_b` (r, out):

    y = x W + b + s * dropout(x) A B,   s = alpha / r  (rsLoRA: alpha / sqrt(r))

A starts Kaiming-uniform (bound 1/sqrt(in), as PEFT's `kaiming_uniform_(a=sqrt(5))`) or Gaussian (std 1/r), B at
zero, so the adapted model equals the base at step 0.

* DoRA (Liu et al. 2024, `config.peft.dora`): a magnitude vector m (out,) initialised to the column norms of W;
  W' = m * (W + s A B) / ||W + s A B||, with the norm treated as a constant in the backward pass (the paper's
  section 4.3, and PEFT's implementation), computed as PEFT does so the outputs match it.
* LoRA+ (Hayou et al. 2024, `config.peft.lora_plus_ratio`): B's learning rate is `ratio` x A's, through the
  strategy's per-path multipliers, i.e. its own optax partition entry.
* QLoRA (Dettmers et al. 2023, `config.peft.quantize='nf4'`): the frozen base kernel is stored as 4-bit NormalFloat
  (`methods/nf4.py`) in the model state, not as a parameter, and dequantised on the fly in each forward pass.

`merge` folds adapters into the kernels (a plain model's parameters) and `unmerge` takes them out again.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from finetune import adapters
from finetune.errors import FinetuneError
from finetune.methods import nf4

INITS = ("kaiming", "gaussian")
QUANTIZATIONS = ("", "nf4")


class Quantized(nnx.Variable):
  """Compressed frozen base weights: model state, not a parameter (never differentiated, no optimizer state)."""


def _pattern_rule(patterns, module_path: str, what: str) -> tuple[str, float] | None:
  """The first (regex, value) of `patterns` whose regex is found in `module_path`, or None."""
  for rule in patterns:
    if len(rule) != 2 or not isinstance(rule[1], (int, float)):
      raise FinetuneError(f"config.peft.{what} entry {tuple(rule)!r} must be (regex over module paths, number)")
    if re.search(rule[0], module_path):
      return tuple(rule)
  return None


class LoRALinear(adapters.UsesCallContext, nnx.Module):
  """An `nnx.Linear` with a low-rank update; see the module docstring."""

  def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rslora: bool = False, dropout: float = 0.0,
               init: str = "kaiming", dora: bool = False, quantize: str = "", block_size: int = 64,
               double_quant: bool = True, rngs: nnx.Rngs, path: str = "", rank_from: str = ""):
    in_features, out_features = base.in_features, base.out_features
    if not 1 <= rank <= min(in_features, out_features):
      raise FinetuneError(f"{rank_from or f'config.peft.rank={rank}'} for {path or 'a layer'} of shape "
                          f"({in_features}, {out_features}): the rank must be between 1 and "
                          f"{min(in_features, out_features)}; " + ("lower that entry's rank" if rank_from else
                                                                   "lower the rank or use config.peft.rank_pattern "
                                                                   "for this layer"))
    self.in_features, self.out_features, self.rank, self.alpha = in_features, out_features, rank, float(alpha)
    self.scaling = float(alpha) / (math.sqrt(rank) if rslora else rank)
    self.dropout_rate, self.dora, self.quantize = float(dropout), bool(dora), quantize
    self.kernel_shape = (in_features, out_features)
    self.quant_block_size = block_size
    axes = adapters.logical_axes_of(base.kernel)
    kernel = base.kernel.get_value()
    if quantize:
      stored = nf4.quantize(kernel, block_size, double_quant)
      for key, value in stored.items():
        setattr(self, f"kernel_{key}", Quantized(value, sharding=axes if value.ndim == 2 else (None,) * value.ndim))
      self.kernel = None
      kernel = nf4.dequantize(stored, kernel.shape, kernel.dtype)  # what the layer computes with (DoRA's norm)
    else:
      self.kernel = base.kernel
    self.bias = base.bias
    key = rngs.params()
    if init == "kaiming":  # PEFT: kaiming_uniform_(a=sqrt(5)) on (r, in): bound sqrt(6 / ((1 + 5) * in))
      bound = 1.0 / math.sqrt(in_features)
      a = jax.random.uniform(key, (in_features, rank), kernel.dtype, -bound, bound)
    elif init == "gaussian":
      a = jax.random.normal(key, (in_features, rank), kernel.dtype) / rank
    else:
      raise FinetuneError(f"config.peft.init={init!r}; valid: {', '.join(INITS)}")
    self.lora_a = nnx.Param(a, sharding=(axes[0], None))
    self.lora_b = nnx.Param(jnp.zeros((rank, out_features), kernel.dtype), sharding=(None, axes[1]))
    if dora:
      self.lora_magnitude = nnx.Param(jnp.linalg.norm(kernel.astype(jnp.float32), axis=0).astype(kernel.dtype),
                                      sharding=(axes[1],))

  def stored_kernel(self) -> dict[str, jax.Array] | jax.Array:
    """The float kernel, or the NF4 arrays it is stored as (QLoRA)."""
    if self.kernel is not None:
      return self.kernel[...]
    return {key[len("kernel_"):]: getattr(self, key)[...] for key in vars(self)
            if key.startswith("kernel_") and isinstance(getattr(self, key), Quantized)}

  def __call__(self, x: jax.Array) -> jax.Array:
    lora_x = self.dropout_input(x, self.dropout_rate)
    return _apply(x, lora_x, self.stored_kernel(), self.lora_a[...], self.lora_b[...],
                  self.lora_magnitude[...] if self.dora else None, self.bias[...] if self.bias is not None else None,
                  scaling=self.scaling, shape=self.kernel_shape, dropped=lora_x is not x)


def _apply(x, lora_x, stored, a, b, magnitude, bias, *, scaling: float, shape: tuple[int, int], dropped: bool):
  """The adapted layer as a pure function (see the module docstring)."""
  quantized = isinstance(stored, dict)
  base_matmul = (lambda inputs: _nf4_matmul(inputs, stored, shape)) if quantized else (lambda inputs: inputs @ stored)
  y = base_matmul(x)
  update = (lora_x @ a) @ b
  if magnitude is not None:  # DoRA
    kernel = nf4.dequantize(stored, shape, x.dtype) if quantized else stored
    merged = kernel + scaling * (a @ b)  # (in, out)
    norm = jax.lax.stop_gradient(jnp.linalg.norm(merged, axis=0))  # (out,): a constant in the backward pass
    magnitude_scale = magnitude / norm
    # PEFT recomputes the base term on the dropped-out input when dropout is active.
    base = base_matmul(lora_x) if dropped else y
    y = y + (magnitude_scale - 1.0) * base + magnitude_scale * update * scaling
  else:
    y = y + update * scaling
  return y if bias is None else y + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _nf4_matmul(x: jax.Array, stored: dict[str, jax.Array], shape: tuple[int, int]) -> jax.Array:
  """x @ dequantize(stored): the float kernel exists only inside this layer's forward and backward computations.

  Hand-written VJP because autodiff would keep each layer's dequantised kernel from the forward pass alive until
  its backward pass (a float copy of the whole base model, undoing the 4-bit storage), and because the codes do not
  depend on the activations, XLA may otherwise dequantise every layer up front; the optimisation barriers tie
  each dequantisation to the data flowing through the layer.
  """
  return _nf4_forward(x, stored, shape)[0]


def _nf4_forward(x, stored, shape):
  x, stored = jax.lax.optimization_barrier((x, stored))
  return x @ nf4.dequantize(stored, shape, x.dtype), stored


def _nf4_backward(shape, stored, upstream):
  upstream, stored = jax.lax.optimization_barrier((upstream, stored))
  kernel = nf4.dequantize(stored, shape, upstream.dtype)
  return upstream @ kernel.T, jax.tree.map(jnp.zeros_like, stored)  # the codes get no gradient


_nf4_matmul.defvjp(lambda x, stored, shape: _nf4_forward(x, stored, shape), _nf4_backward)


def settings(peft_cfg: ConfigDict, module_path: str) -> dict[str, Any]:
  """Rank and alpha of one module after `rank_pattern` / `alpha_pattern` (first matching regex wins)."""
  rank_rule = _pattern_rule(peft_cfg.rank_pattern, module_path, "rank_pattern")
  alpha_rule = _pattern_rule(peft_cfg.alpha_pattern, module_path, "alpha_pattern")
  return {"rank": int(rank_rule[1] if rank_rule else peft_cfg.rank),
          "alpha": float(alpha_rule[1] if alpha_rule else peft_cfg.alpha)}


def _check_patterns_match(peft_cfg: ConfigDict, module_paths: list[str]) -> None:
  """Every rank_pattern / alpha_pattern regex must name an adapted layer: one matching nothing is a typo (or a
  layer left out of `targets`), and PEFT would ignore it silently."""
  for key in ("rank_pattern", "alpha_pattern"):
    rules = [regex for regex, _ in peft_cfg[key]]
    for index, regex in enumerate(rules):
      matched = [path for path in module_paths if re.search(regex, path)]
      if not matched:
        raise FinetuneError(f"config.peft.{key} regex {regex!r} matches no adapted layer; the adapted layers: "
                            f"{', '.join(module_paths[:4])}{', ...' if len(module_paths) > 4 else ''}")
      # The first matching entry wins (as in PEFT): one whose every layer an earlier entry takes sets nothing.
      earlier = [next((r for r in rules[:index] if re.search(r, path)), None) for path in matched]
      if all(earlier):
        more = ", ..." if len(matched) > 2 else ""
        raise FinetuneError(f"config.peft.{key} entry {regex!r} sets no layer: the earlier entry {earlier[0]!r} "
                            f"takes every layer it matches ({', '.join(matched[:2])}{more}; the first matching entry "
                            "wins); put the more specific entry first")


def inject(model: nnx.Module, peft_cfg: ConfigDict, rngs: nnx.Rngs) -> None:
  check_config(peft_cfg)  # (again: library callers may build a model from a config that was never validated)
  selected = adapters.select_modules(model, peft_cfg.targets, exclude=adapters.saved_modules(peft_cfg))
  _check_patterns_match(peft_cfg, [path for path, _ in selected])
  for path, module in selected:
    rank_rule = _pattern_rule(peft_cfg.rank_pattern, path, "rank_pattern")
    adapters.replace_module(model, path, LoRALinear(
        module, **settings(peft_cfg, path), rslora=peft_cfg.rslora, dropout=peft_cfg.dropout, init=peft_cfg.init,
        dora=peft_cfg.dora, quantize=peft_cfg.quantize, block_size=peft_cfg.quant_block_size,
        double_quant=peft_cfg.double_quant, rngs=rngs, path=path,
        rank_from=f"config.peft.rank_pattern entry {rank_rule!r}" if rank_rule else ""))


def lr_multiplier(path: str, peft_cfg: ConfigDict) -> float:
  """LoRA+: B learns `lora_plus_ratio` times faster than A (the paper's lambda = eta_B / eta_A; 16 is its default).

  As in the paper, only B: HF PEFT's `create_loraplus_optimizer` also gives the ratio to every 1-D trainable
  parameter (DoRA magnitudes, trained biases), so DoRA or bias training with LoRA+ differ from a PEFT run there."""
  return float(peft_cfg.lora_plus_ratio) if peft_cfg.lora_plus_ratio and path.endswith("/lora_b") else 1.0


def from_base_checkpoint(arrays: dict[str, dict[str, np.ndarray]], param_paths: list[str],
                         model_state_paths: list[str], peft_cfg: ConfigDict,
                         seed: int) -> dict[str, dict[str, np.ndarray]]:
  """A float base checkpoint as the adapted model reads it. QLoRA: each quantized layer's `kernel` becomes its NF4
  model-state entries. DoRA: magnitudes the checkpoint lacks start at the column norms of the loaded kernels (of
  their dequantised values under QLoRA, as PEFT does), so the adapted model equals the loaded base at step 0."""
  del seed  # (nothing here is drawn)
  params, model_state = dict(arrays["params"]), dict(arrays.get("model_state", {}))
  dequantized = {}
  for path in model_state_paths:
    if not path.endswith("/kernel_codes") or path in model_state:
      continue
    module = path[:-len("/kernel_codes")]
    if f"{module}/kernel" not in params:
      continue  # load_into names what is missing
    kernel = jnp.asarray(params.pop(f"{module}/kernel"))
    stored = nf4.quantize(kernel, peft_cfg.quant_block_size, peft_cfg.double_quant)
    model_state.update({f"{module}/kernel_{k}": np.asarray(v) for k, v in stored.items()})
    dequantized[module] = np.asarray(nf4.dequantize(stored, kernel.shape, kernel.dtype))
  for path in param_paths:
    module = path[:-len("/lora_magnitude")]
    if path.endswith("/lora_magnitude") and path not in params:
      kernel = dequantized.get(module, params.get(f"{module}/kernel"))
      if kernel is not None:
        params[path] = np.linalg.norm(np.asarray(kernel, np.float32), axis=0)
  return {**arrays, "params": params, "model_state": model_state}


# ------------------------------------------------------------------------------------------ merge / unmerge


def lora_modules(model: nnx.Module) -> dict[str, LoRALinear]:
  return dict(adapters.module_paths(model, LoRALinear))


def _delta(module: LoRALinear, a, b) -> np.ndarray:
  return module.scaling * (np.asarray(a, np.float64) @ np.asarray(b, np.float64))


def dequantized_base(abstract_model: nnx.Module, params: dict[str, Any], model_state: dict[str, Any]
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Flat params / model state with every QLoRA layer's NF4 arrays (model state `kernel_*`) replaced by the float
  `kernel` param they dequantise to: the base weights as a plain model reads them."""
  params = {p: np.asarray(v) for p, v in params.items()}
  model_state = {p: np.asarray(v) for p, v in model_state.items()}
  for path, module in lora_modules(abstract_model).items():
    if module.quantize:
      stored = {key[len(path) + len("/kernel_"):]: jnp.asarray(model_state.pop(key)) for key in list(model_state)
                if key.startswith(f"{path}/kernel_")}
      params[f"{path}/kernel"] = np.asarray(nf4.dequantize(stored, module.kernel_shape))
  return params, model_state


def merge(abstract_model: nnx.Module, params: dict[str, Any], model_state: dict[str, Any]
          ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Flat {path: array} of the adapted model -> those of the plain model with every update folded into `kernel`
  (QLoRA kernels dequantised first). The plain model's outputs equal the adapted model's."""
  params, model_state = dequantized_base(abstract_model, params, model_state)
  for path, module in lora_modules(abstract_model).items():
    a, b = params.pop(f"{path}/lora_a"), params.pop(f"{path}/lora_b")
    kernel = params[f"{path}/kernel"]
    merged = np.asarray(kernel, np.float64) + _delta(module, a, b)
    if module.dora:
      magnitude = np.asarray(params.pop(f"{path}/lora_magnitude"), np.float64)
      merged = merged * (magnitude / np.linalg.norm(merged, axis=0))
    params[f"{path}/kernel"] = merged.astype(kernel.dtype)
  return params, model_state


def effective(abstract_model: nnx.Module) -> Callable[[dict[str, Any]], dict[str, Any]]:
  """`merge` as a traceable function of the flat params, for EWC and L2-SP inside the train step: each float LoRA
  layer's `kernel` becomes W + s A B (DoRA: rescaled to its magnitudes), its adapter entries dropped. QLoRA layers
  keep their base in model state, not in params: left as they are (their base is not anchored)."""
  layers = {path: module for path, module in lora_modules(abstract_model).items() if not module.quantize}

  def weights(params: dict[str, Any]) -> dict[str, Any]:
    params = dict(params)
    for path, module in layers.items():
      a, b = params.pop(f"{path}/lora_a"), params.pop(f"{path}/lora_b")
      kernel = params[f"{path}/kernel"].astype(jnp.float32)
      merged = kernel + module.scaling * (a.astype(jnp.float32) @ b.astype(jnp.float32))
      if module.dora:
        magnitude = params.pop(f"{path}/lora_magnitude").astype(jnp.float32)
        merged = merged * (magnitude / jnp.linalg.norm(merged, axis=0))
      params[f"{path}/kernel"] = merged
    return params

  return weights


def unmerge(abstract_model: nnx.Module, merged: dict[str, Any], adapter: dict[str, Any]) -> dict[str, np.ndarray]:
  """The base kernels back from merged ones and the adapter that was merged (plain LoRA; DoRA's rescaling cannot
  be undone without the base norms, so it is refused)."""
  params = {p: np.asarray(v) for p, v in merged.items()}
  for path, module in lora_modules(abstract_model).items():
    if module.dora:
      raise FinetuneError("unmerge of a DoRA adapter is not supported: keep the base checkpoint instead")
    kernel = params[f"{path}/kernel"]
    params[f"{path}/kernel"] = (np.asarray(kernel, np.float64) -
                                _delta(module, adapter[f"{path}/lora_a"], adapter[f"{path}/lora_b"])
                                ).astype(kernel.dtype)
  return params


def merge_weighted(abstract_model: nnx.Module, base: dict[str, Any], weighted: list[tuple[dict[str, Any], float]]
                   ) -> dict[str, np.ndarray]:
  """Plain-model parameters with a weighted sum of LoRA adapters folded in: W + sum_i w_i s A_i B_i (exact, unlike
  averaging A and B separately). Each adapter is {path: array} for this model's LoRA layers."""
  params = {p: np.asarray(v) for p, v in base.items() if not p.endswith(("/lora_a", "/lora_b"))}
  for path, module in lora_modules(abstract_model).items():
    if module.dora or module.quantize:
      raise FinetuneError("weighted adapter combination supports plain LoRA adapters on float kernels")
    kernel = params[f"{path}/kernel"]
    total = np.asarray(kernel, np.float64)
    for adapter, weight in weighted:
      # A layer an adapter does not hold keeps the base's factors, as `AdapterBank.model` reads it.
      factors = [adapter.get(f"{path}/{name}", base[f"{path}/{name}"]) for name in ("lora_a", "lora_b")]
      total = total + weight * _delta(module, *factors)
    params[f"{path}/kernel"] = total.astype(kernel.dtype)
  return params


def check_config(peft_cfg: ConfigDict) -> None:
  """The LoRA settings a config alone decides are wrong (config.validate; inject would refuse them only when the
  stage opens, after earlier stages trained)."""
  if peft_cfg.init not in INITS:
    raise FinetuneError(f"config.peft.init={peft_cfg.init!r}; valid: {', '.join(INITS)}")
  if peft_cfg.quantize not in QUANTIZATIONS:
    raise FinetuneError(f"config.peft.quantize={peft_cfg.quantize!r}; valid: '' (none) or 'nf4' (QLoRA)")
  block = peft_cfg.quant_block_size
  if isinstance(block, bool) or not isinstance(block, int) or block <= 0 or block % 2:
    raise FinetuneError(f"config.peft.quant_block_size={block!r} must be a positive even integer (two 4-bit codes "
                        "share a byte); QLoRA's default is 64")
  # (quant_block_size and double_quant under quantize='' are not refused: a stage that turns quantisation off
  # inherits the base config's QLoRA settings.)


adapters.PEFT_METHODS.register("lora")(adapters.PeftMethod(
    inject=inject, lr_multiplier=lr_multiplier, convert_checkpoint=from_base_checkpoint, merge=merge,
    effective=effective, check_config=check_config,
    settings=("rank", "alpha", "rslora", "dora", "dropout", "init", "rank_pattern", "alpha_pattern", "lora_plus_ratio",
              "quantize", "quant_block_size", "double_quant")))
