"""Parameter-efficient fine-tuning (PEFT): adapters injected into a built model, each method found by name.

`config.peft.method` names one entry of `PEFT_METHODS` (one file per method in `finetune/methods/`: `lora`
(with rsLoRA, DoRA, LoRA+ and QLoRA as options), `bottleneck` (Houlsby adapters), `prompt` (prompt tuning),
`prefix` (prefix tuning), `bitfit`, `ia3`). A method is a function

    inject(model, peft_cfg, rngs) -> None

that rewires the freshly built model in place (`replace_module`), typically swapping `nnx.Linear` layers chosen by
`config.peft.targets` for an adapted layer that keeps the base parameters at the same paths and adds its own. So
base checkpoints (`init_from`, Hugging Face imports) load unchanged, and layer groups, discriminative rates and
gradual unfreezing apply to adapter parameters through the same path rules as to any other parameter.

Which parameters train (`trainable_paths`): every parameter the method added (paths absent from the plain
model), plus `config.peft.modules_to_save` (regexes; e.g. `^head/` to train the classifier fully), plus biases
per `config.peft.bias` ('none', 'all', 'lora_only'), plus what the method itself names (BitFit: biases). Every
other parameter is frozen: no gradient, no optimizer state (the strategy's 'frozen' partition).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from finetune import files
from finetune import scan
from finetune.checkpoint import load_into, read_checkpoint_arrays, resolve_checkpoint
from finetune.errors import FinetuneError
from finetune.methods import nf4
from finetune.models import build_model, refuse_changed_layout
from finetune.partition import flatten, map_with_path, path_str, require_matches
from finetune.registry import Registry
from finetune.reporting import read_json


@dataclasses.dataclass(frozen=True)
class PeftMethod:
  inject: Callable[[nnx.Module, ConfigDict, nnx.Rngs], None]
  # Base parameters (paths of the plain model) that this method trains itself, e.g. BitFit's biases.
  trains_base: Callable[[str], bool] = lambda path: False
  # Learning-rate multiplier of a trainable path (LoRA+: B faster than A); composes with lr_multipliers.
  lr_multiplier: Callable[[str, ConfigDict], float] = lambda path, cfg: 1.0
  # Checkpoint arrays of the plain model -> those this adapted model reads: (arrays, param paths, model-state
  # paths, config.peft, the stage's seed) -> arrays. QLoRA quantizes kernels; adapter values that derive from base
  # weights (DoRA's magnitudes, prompt tuning's initial prompt, drawn with the seed) are set from the *loaded*
  # weights, not the random initial ones.
  convert_checkpoint: Callable[[dict, list, list, ConfigDict, int], dict] = \
      lambda arrays, params, state, cfg, seed: arrays
  # (abstract adapted model, flat params, flat model state) -> the plain model's (params, model state) with the
  # adaptation folded in, or None where the method changes the computation in a way no plain model can hold.
  merge: Callable[[nnx.Module, dict, dict], tuple[dict, dict]] | None = None
  # (abstract adapted model, unrolled) -> a traceable function from the flat params to the weights the adapted
  # layers compute with, under the plain model's paths (adapter entries dropped): what EWC and L2-SP compare with
  # an earlier task's (folded) weights. None: the regularizers see the parameters as they are.
  effective: Callable[[nnx.Module], Callable[[dict], dict]] | None = None
  # The config.peft keys only this method reads (beyond method, targets, modules_to_save, bias, load_adapter): under
  # another method each must keep its default, or the config check refuses it as silently ignored.
  settings: tuple[str, ...] = ()
  # How the method reads config.peft.targets: 'required' (it adapts those layers; bias='lora_only' trains their
  # biases), 'optional' (prompt tuning: picks the embedding layer when several exist) or 'ignored' (prefix tuning
  # adapts every attention layer, BitFit every bias): the config check refuses targets the method would ignore.
  targets: str = "required"
  # (config.peft) -> None; raises FinetuneError for settings of this method that the config alone decides are wrong,
  # from config.validate, so a later stage's mistake fails before earlier stages train.
  check_config: Callable[[ConfigDict], None] = lambda peft_cfg: None


PEFT_METHODS: Registry[PeftMethod] = Registry("peft method")
BIAS_MODES = ("none", "all", "lora_only")


def enabled(peft_cfg: ConfigDict) -> bool:
  return bool(peft_cfg.method)


def effective_weights(abstract_model: nnx.Module, peft_cfg: ConfigDict) -> Callable[[dict], dict] | None:
  """`PeftMethod.effective` of the stage's method for its (unrolled) abstract model, or None."""
  if not enabled(peft_cfg) or PEFT_METHODS.get(peft_cfg.method).effective is None:
    return None
  return PEFT_METHODS.get(peft_cfg.method).effective(abstract_model)


def apply(model: nnx.Module, peft_cfg: ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  """Injects the adapters of `config.peft` into `model` (in place) and returns it; no-op without a method."""
  if enabled(peft_cfg):
    with nnx.use_eager_sharding(False):  # as in models.build_model: shardings are applied by finetune.sharding
      PEFT_METHODS.get(peft_cfg.method).inject(model, peft_cfg, rngs)
  return model


def prepare_checkpoint(peft_cfg: ConfigDict, arrays: dict[str, dict[str, Any]], param_paths: list[str],
                       state_paths: list[str], seed: int) -> dict[str, dict[str, Any]]:
  """A base checkpoint's arrays as the adapted model reads them (see `PeftMethod.convert_checkpoint`)."""
  if not enabled(peft_cfg):
    return arrays
  return PEFT_METHODS.get(peft_cfg.method).convert_checkpoint(arrays, param_paths, state_paths, peft_cfg, seed)


# The PEFT settings that shape an adapted model's function and its stored arrays (dropout, init, LoRA+ and bias
# only change training). A checkpoint is read as it is only by a stage whose settings are these same ones.
_FUNCTION_SETTINGS = ("method", "targets", "rank", "alpha", "rank_pattern", "alpha_pattern", "rslora", "dora",
                      "quantize", "quant_block_size", "double_quant", "num_virtual_tokens", "bottleneck_size",
                      "feedforward")


def same_adapters(a: ConfigDict, b: ConfigDict) -> bool:
  as_json = lambda cfg, key: json.dumps(cfg.get(key), sort_keys=True, default=list)  # (tuples and lists alike)
  return all(as_json(a, key) == as_json(b, key) for key in _FUNCTION_SETTINGS)


def fold_source_adapters(step_dir: str, arrays: dict[str, dict[str, Any]], peft_cfg: ConfigDict,
                         param_paths: Sequence[str] | None = None,
                         whenever_possible: bool = False) -> dict[str, dict[str, Any]]:
  """A checkpoint of one of our PEFT runs, read by a stage with other PEFT settings (another method, other
  targets, rank, alpha, DoRA, quantisation, ... or none): its adapters folded into the (dequantised) base weights
  (`merge`), so the stage starts from the function the source trained and its own adapters start at zero. Loading
  the arrays as they are would silently drop adapters the stage does not have, rescale those it has or combine
  them with other magnitudes. Checkpoints of runs without PEFT, or with the stage's own settings, are returned as
  they are.

  `param_paths`: the stage's parameters; the checkpoint is returned as is only if the stage holds all of its
  parameters. None: the settings alone decide. `whenever_possible`: folded also under the stage's own settings when
  the method has `effective` (the forgetting lineage: EWC and L2-SP compare the weights layers compute with)."""
  run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(step_dir))), "config.json")
  if not os.path.isfile(run_config):
    return arrays
  source = ConfigDict(read_json(run_config))
  source_peft = source.get("peft", ConfigDict({"method": ""}))
  if not enabled(source_peft):
    return arrays
  fits_stage = param_paths is None or set(arrays.get("params", {})) <= set(param_paths)
  method = PEFT_METHODS.get(source_peft.method)
  # (Only where the stage's penalty folds its own adapters too, `effective`: a continued IA3 run, folded here but
  # compared unfolded, was pulled towards W diag(l) and its scales left unanchored.)
  fold_anyway = whenever_possible and method.merge is not None and method.effective is not None
  if fits_stage and same_adapters(source_peft, peft_cfg) and not fold_anyway:
    return arrays
  params = arrays["params"]
  merged, model_state = merge(abstract_model(source.model, source_peft, checkpoint_num_classes(params)), source_peft,
                              params, arrays.get("model_state", {}))
  return {**arrays, "params": merged, "model_state": model_state}


def checkpoint_num_classes(params: dict[str, Any]) -> int:
  """The classes of a checkpoint's head; 0 for a model without one (language models). A QLoRA-quantized head keeps
  its kernel as NF4 codes in the model state, so its LoRA B (r, classes) and bias are read as well."""
  for path in ("head/kernel", "head/lora_b", "head/bias"):
    if path in params:
      return int(params[path].shape[-1])
  return 0


def abstract_model(model_cfg: ConfigDict, peft_cfg: ConfigDict, num_classes: int) -> nnx.Module:
  """The adapted model's structure and shapes, nothing allocated (what merge and export read settings from)."""
  return nnx.eval_shape(lambda: apply(build_model(model_cfg, num_classes, nnx.Rngs(params=0)), peft_cfg,
                                      nnx.Rngs(params=1)))


def load_model(model_cfg: ConfigDict, peft_cfg: ConfigDict, num_classes: int, checkpoint: str = "",
               adapter: str = "", seed: int = 0) -> nnx.Module:
  """A ready model for notebooks and tests: the adapted model, base weights from `checkpoint` (a run, step folder
  or Hugging Face directory; QLoRA quantizes them), then an adapter (ours or PEFT's) loaded onto it."""

  base = build_model(model_cfg, num_classes, nnx.Rngs(params=seed))
  base_paths = frozenset(flatten(nnx.state(base, nnx.Param).to_pure_dict()))
  model = apply(base, peft_cfg, nnx.Rngs(params=seed + 1))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = params.to_pure_dict(), rest.to_pure_dict()
  if checkpoint:
    step_dir = resolve_checkpoint(checkpoint, os.getcwd())
    # A PEFT run's checkpoint read with other settings (or none): its adapters folded in, as `init_from` does.
    arrays = fold_source_adapters(step_dir, read_checkpoint_arrays(step_dir), peft_cfg, list(flatten(params)))
    arrays = prepare_checkpoint(peft_cfg, arrays, list(flatten(params)), list(flatten(rest)), seed)
    added = frozenset(flatten(params)) - base_paths
    params, _, _ = load_into(params, arrays["params"], (), "parameter", step_dir, added)
    rest, _, _ = load_into(rest, arrays.get("model_state", {}), (), "model state", step_dir)
  if adapter:
    from finetune import peft_format  # pylint: disable=g-import-not-at-top
    arrays, _ = peft_format.read_any_adapter(adapter, model_cfg, peft_cfg, model, num_classes)
    params = with_arrays(params, arrays)
  return nnx.merge(graphdef, params, rest)


def with_arrays(tree: Any, arrays: dict[str, np.ndarray]) -> Any:
  """`tree` (of jax arrays) with the leaves named in `arrays` replaced, each keeping its dtype and sharding."""
  return map_with_path(lambda path, leaf: jax.device_put(np.asarray(arrays[path], leaf.dtype), leaf.sharding)
                       if path in arrays else leaf, tree)


class AdapterBank:
  """Several named adapters on one base model: switch the active one (`model(name)`), or fold a weighted sum of
  LoRA adapters into the base weights (`combined({name: weight})`, a plain model). The base is held once; each
  adapter is only its own tensors ({path: array}, as `load_adapter` / `read_any_adapter` return)."""

  def __init__(self, model_cfg: ConfigDict, peft_cfg: ConfigDict, num_classes: int, checkpoint: str = ""):
    self.model_cfg, self.peft_cfg, self.num_classes = model_cfg, peft_cfg, num_classes
    model = load_model(model_cfg, peft_cfg, num_classes, checkpoint)
    self.abstract = nnx.eval_shape(lambda: model)
    self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
    self.base = {p: np.asarray(v) for p, v in flatten(params.to_pure_dict()).items()}
    self.adapters: dict[str, dict[str, np.ndarray]] = {}

  def add(self, name: str, source: str | dict[str, np.ndarray]) -> None:
    """Adds adapter `name` from a folder (ours or PEFT's) or from {path: array}."""
    if name in self.adapters:
      raise FinetuneError(f"an adapter named {name!r} is already loaded; pick another name")
    if isinstance(source, str):
      from finetune import peft_format  # pylint: disable=g-import-not-at-top
      arrays, _ = peft_format.read_any_adapter(source, self.model_cfg, self.peft_cfg, self.abstract,
                                               self.num_classes)
    else:
      arrays = source
      check_adapter_fits({}, arrays, {p: tuple(v.shape) for p, v in self.base.items()}, name)
    self.adapters[name] = {p: np.asarray(v) for p, v in arrays.items()}

  def names(self) -> list[str]:
    return list(self.adapters)

  def _get(self, name: str) -> dict[str, np.ndarray]:
    if name not in self.adapters:
      raise FinetuneError(f"no adapter named {name!r}; loaded: {', '.join(self.adapters) or '(none)'}")
    return self.adapters[name]

  def model(self, name: str) -> nnx.Module:
    """The base with adapter `name` active."""
    flat = {**self.base, **self._get(name)}
    params = map_with_path(lambda path, leaf: flat[path], nnx.state(self.abstract, nnx.Param).to_pure_dict())
    return nnx.merge(self.graphdef, params, self.rest)

  def combined(self, weights: dict[str, float]) -> nnx.Module:
    """The plain base model with sum_i w_i * (adapter i's update W_i' - W) folded in (plain LoRA adapters).

    Parameters an adapter trains fully (its head) combine the same way: base + sum_i w_i (theirs_i - base)."""
    if self.peft_cfg.method != "lora":  # (another method's bank combined to the plain base, silently)
      raise FinetuneError(f"combining adapters adds weighted LoRA updates; this bank holds "
                          f"{self.peft_cfg.method!r} adapters: use model(name) for each")
    chosen = [(self._get(n), float(w)) for n, w in weights.items()]
    merged = lora.merge_weighted(self.abstract, self.base, chosen)
    for path in {p for adapter, _ in chosen for p in adapter if p in merged}:
      merged[path] = self.base[path] + sum(w * (adapter.get(path, self.base[path]) - self.base[path])
                                           for adapter, w in chosen)
    plain = abstract_model(self.model_cfg, ConfigDict({"method": ""}), self.num_classes)
    graphdef, params, rest = nnx.split(plain, nnx.Param, ...)
    params = map_with_path(lambda path, leaf: merged[path], params.to_pure_dict())
    ours = flatten(self.rest.to_pure_dict())
    rest = map_with_path(lambda path, leaf: ours[path], rest.to_pure_dict())
    return nnx.merge(graphdef, params, rest)


def merge(abstract: nnx.Module, peft_cfg: ConfigDict, params: dict[str, Any], model_state: dict[str, Any]
          ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Flat params / model state of the adapted model -> those of the plain model computing the same function."""
  method = PEFT_METHODS.get(peft_cfg.method)
  if method.merge is None:
    raise FinetuneError(f"PEFT method {peft_cfg.method!r} cannot be folded into the base weights (it adds "
                        "computation a plain model lacks); use such a run through its adapter (<run>/adapter/, "
                        "finetune.adapters.load_model(..., adapter=...)), or continue from it with the same "
                        "config.peft")
  return method.merge(abstract, params, model_state)


# ------------------------------------------------------------------------------------------- module surgery


def module_paths(model: nnx.Module, kind: type = nnx.Linear) -> list[tuple[str, nnx.Module]]:
  """[(module path, module)] of every `kind` sub-module, in graph order (paths as parameter paths, no leaf)."""
  return [(path_str(path), node) for path, node in nnx.iter_graph(model) if isinstance(node, kind) and path]


def saved_modules(peft_cfg: ConfigDict) -> list[str]:
  """`select_modules`' `exclude` for `config.peft.modules_to_save`: a layer trained fully gets no adapter (as in
  PEFT), whichever method adds it. The regexes as `trainable_paths` reads them: 'layers/1/' stripped to 'layers/1'
  also excluded layers 10, 11, ..., which then had no adapter and did not train."""
  return list(peft_cfg.modules_to_save)


def select_modules(model: nnx.Module, targets: Sequence[str], what: str = "config.peft.targets",
                   kind: type = nnx.Linear, exclude: Sequence[str] = ()) -> list[tuple[str, nnx.Module]]:
  """The `kind` modules named by `targets`: a bare name (`query`, `q_proj`) matches a module whose own name is
  that (as PEFT's `target_modules`); anything else is a regex searched in the module path
  (`layers/[0-5]/attention/(query|value)`). Every target must match a module, or the error lists some paths."""
  if not targets:
    raise FinetuneError(f"{what} is empty; name the layers to adapt, e.g. ('query', 'value') or a regex over "
                        "module paths")
  # `exclude` holds parameter-path regexes (modules_to_save: '^head/', '^head/kernel$'): a module is excluded when
  # one of them finds its path, its path with the trailing '/' its parameter paths begin with, or one of those.
  def excluded(path: str, module: nnx.Module) -> bool:
    own = [path, path + "/"] + [f"{path}/{leaf}" for leaf in flatten(nnx.state(module, nnx.Param).to_pure_dict())]
    return any(re.search(pattern, name) for pattern in exclude for name in own)

  every_module = module_paths(model, kind)
  candidates = [(p, m) for p, m in every_module if not (exclude and excluded(p, m))]
  if not candidates:  # (the message below listed none: "its layers are named like ")
    raise FinetuneError(f"{what}: this model has no {kind.__name__} layer to adapt"
                        f"{' outside config.peft.modules_to_save' if exclude else ''}; choose a PEFT method for its "
                        "layers, or a model with them")
  chosen: dict[str, nnx.Module] = {}
  for target in targets:
    if re.fullmatch(r"\w+", target):
      named = [p for p, _ in every_module if p.rsplit("/", 1)[-1] == target]
    else:
      try:
        regex = re.compile(target)
      except re.error as e:
        raise FinetuneError(f"{what}: {target!r} is not a valid regex ({e}); fix the pattern") from None
      named = [p for p, _ in every_module if regex.search(p)]
    hits = [(p, m) for p, m in candidates if p in named]
    saved = sorted(set(named) - {p for p, _ in candidates})
    if not hits and saved:  # (it said the layer did not exist)
      raise FinetuneError(f"{what}: {target!r} names only {', '.join(saved[:3])}, which config.peft.modules_to_save "
                          "trains fully (no adapter there); drop it from one of the two")
    if not hits:
      examples = ", ".join(p for p, _ in candidates[:6])
      raise FinetuneError(f"{what}: {target!r} matches no {kind.__name__} layer of this model; its layers are "
                          f"named like {examples}{', ...' if len(candidates) > 6 else ''}")
    chosen.update(hits)
  return [(p, chosen[p]) for p, _ in candidates if p in chosen]


def replace_module(model: nnx.Module, path: str, new: nnx.Module) -> None:
  """Sets the sub-module at `path` ('layers/0/attention/query') to `new`."""
  *parents, last = path.split("/")
  node = model
  for part in parents:
    node = node[int(part)] if part.isdigit() else getattr(node, part)
  if last.isdigit():
    node[int(last)] = new
  else:
    setattr(node, last, new)


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
  """The logical axis names an existing parameter was created with (see models/layers.py)."""
  metadata = variable.get_metadata()
  names = metadata.get("out_sharding") or metadata.get("sharding_names") or metadata.get("sharding")
  return tuple(names) if names else (None,) * variable.get_value().ndim


# --------------------------------------------------------------------------------------- call-time context


class UsesCallContext:
  """Mixin for adapter layers that need `train` and dropout keys, which models pass down to blocks but not to
  their dense layers. `call_context` sets them for the duration of one forward pass and clears them after, so
  the model holds no RNG state between calls and its graph structure never changes."""

  context_train: bool = False
  context_rngs: nnx.Rngs | None = None

  def dropout_input(self, x: jax.Array, rate: float) -> jax.Array:
    if not rate or not self.context_train or self.context_rngs is None:
      return x
    keep = jax.random.bernoulli(self.context_rngs.dropout(), 1.0 - rate, x.shape)
    return jax.numpy.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


@contextlib.contextmanager
def call_context(model: nnx.Module, train: bool, rngs: nnx.Rngs | None) -> Iterator[None]:
  layers = [node for _, node in nnx.iter_graph(model) if isinstance(node, UsesCallContext)] if train else []
  for layer in layers:
    layer.context_train, layer.context_rngs = True, rngs
  try:
    yield
  finally:
    for layer in layers:
      layer.context_train, layer.context_rngs = False, None


# ------------------------------------------------------------------------------------- what trains, counts


def _adapted_modules(added: Sequence[str], base_paths: set[str]) -> set[str]:
  """The base model's modules that the added parameters belong to: for each, its longest path prefix that is a
  module of the base (`.../query` for `.../query/lora_a` and for a bottleneck's `.../query/adapter_down/kernel`)."""
  base_modules = {"/".join(parts[:i]) for parts in (b.split("/") for b in base_paths) for i in range(1, len(parts))}
  modules = set()
  for path in added:
    parts = path.split("/")
    modules.add(next(("/".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)
                      if "/".join(parts[:i]) in base_modules), path.rsplit("/", 1)[0]))
  return modules


def trainable_paths(peft_cfg: ConfigDict, paths: Sequence[str], base_paths: set[str]) -> frozenset[str]:
  """The parameters a PEFT stage trains (see the module docstring); all others are frozen for the stage."""
  if peft_cfg.bias not in BIAS_MODES:
    raise FinetuneError(f"config.peft.bias={peft_cfg.bias!r}; valid: {', '.join(BIAS_MODES)}")
  method = PEFT_METHODS.get(peft_cfg.method)
  added = [p for p in paths if p not in base_paths]
  adapted_modules = _adapted_modules(added, base_paths)
  require_matches(peft_cfg.modules_to_save, list(paths), "config.peft.modules_to_save")
  keep = [re.compile(p) for p in peft_cfg.modules_to_save]
  trainable = set(added)
  for path in paths:
    if path in trainable:
      continue
    is_bias = path.endswith("/bias")
    if (any(r.search(path) for r in keep) or method.trains_base(path) or (is_bias and peft_cfg.bias == "all") or
        (is_bias and peft_cfg.bias == "lora_only" and path.rsplit("/", 1)[0] in adapted_modules)):
      trainable.add(path)
  if not trainable:  # (BitFit on a model without biases, e.g. Llama)
    raise FinetuneError(f"config.peft.method={peft_cfg.method!r} leaves nothing to train in this model (BitFit "
                        "needs bias parameters); name layers to train fully in config.peft.modules_to_save, or "
                        "choose another method")
  return frozenset(trainable)


def report(peft_cfg: ConfigDict, shapes: dict[str, tuple[int, ...]], trainable: frozenset[str],
           base_paths: set[str], quantized: Sequence[tuple[int, ...]] = (), abstract_params: dict | None = None
           ) -> dict[str, Any]:
  """Trainable-parameter count and percentage of the adapted model (quantized base kernels count as parameters),
  and with QLoRA the bytes of the stored parameters against the same model kept in float32 and bfloat16."""
  quantized_elements = sum(math.prod(s) for s in quantized)
  total = sum(math.prod(s) for s in shapes.values()) + quantized_elements
  count = sum(math.prod(shapes[p]) for p in trainable)
  added = [p for p in shapes if p not in base_paths]
  info = {"method": peft_cfg.method, "trainable_params": count, "total_params": total,
          "trainable_percent": 100.0 * count / max(total, 1),
          "adapted_modules": len(_adapted_modules(added, base_paths))}
  if quantized:
    kernels = nf4.memory_report(list(quantized), peft_cfg.quant_block_size, peft_cfg.double_quant)
    rest = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in (abstract_params or {}).values())
    info["stored_bytes"] = {"stored": kernels["nf4"] + rest, "float32": 4 * total, "bfloat16": 2 * total,
                            "base_kernels_nf4": kernels["nf4"], "base_kernels_float32": kernels["float32"]}
  return info


def describe(info: dict[str, Any]) -> str:
  text = (f"peft {info['method']}: {info['trainable_params']:,} trainable of {info['total_params']:,} parameters "
          f"({info['trainable_percent']:.2f}%), {info['adapted_modules']} adapted modules")
  if "stored_bytes" in info:
    stored = info["stored_bytes"]
    text += (f"; parameters stored in {stored['stored'] / 2**20:.2f} MiB (NF4 base kernels) vs "
             f"{stored['float32'] / 2**20:.2f} MiB float32, {stored['bfloat16'] / 2**20:.2f} MiB bfloat16")
  return text


# ------------------------------------------------------------------------------- adapter-only checkpoints

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"


def save_adapter(directory: str, params: dict[str, np.ndarray], trainable: Sequence[str], peft_cfg: ConfigDict,
                 model_cfg: ConfigDict, name: str = "default") -> str:
  """Writes only the trained parameters (adapters, modules_to_save, trained biases): `adapter.safetensors` (our
  parameter paths) and `adapter.json` (the PEFT config and the base model it belongs to). Atomic."""
  os.makedirs(directory, exist_ok=True)
  tensors = {path: np.ascontiguousarray(np.asarray(params[path])) for path in trainable}
  shapes = {path: list(value.shape) for path, value in params.items()}
  meta = {"name": name, "peft": peft_cfg.to_dict(), "model": model_cfg.to_dict(), "base_shapes": shapes,
          "format": scan.FORMAT}
  with files.atomic_path(os.path.join(directory, ADAPTER_WEIGHTS)) as tmp_weights:
    files.save_safetensors(tensors, tmp_weights)
  files.write_text(os.path.join(directory, ADAPTER_CONFIG), json.dumps(meta, indent=2, default=list))
  return directory


def is_adapter_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS)) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def load_adapter(directory: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(metadata, {path: array}) of an adapter written by `save_adapter`."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  if not is_adapter_dir(directory):
    raise FinetuneError(f"{directory} is not an adapter directory (needs {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}); "
                        "adapters are written to <run>/adapter/ at the end of a PEFT stage")
  meta = read_json(os.path.join(directory, ADAPTER_CONFIG))
  arrays = load_file(os.path.join(directory, ADAPTER_WEIGHTS))
  stored_format = scan.format_number(meta, os.path.join(directory, ADAPTER_CONFIG), "save the adapter again")
  refuse_changed_layout(arrays, stored_format, f"adapter {directory}", "train that adapter again")
  return meta, arrays


def check_adapter_fits(meta: dict[str, Any], arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]],
                       source: str) -> None:
  """An adapter made for another base model (other width, depth or targets) must not load: name the mismatch."""
  for path, value in arrays.items():
    if path not in shapes:
      raise FinetuneError(f"adapter {source} has {path!r}, which this model does not have: it was made for another "
                          f"base model or PEFT config ({meta.get('model', {}).get('name', '?')}, "
                          f"{meta.get('peft', {}).get('method', '?')}); match config.model and config.peft to it")
    if tuple(value.shape) != tuple(shapes[path]):
      raise FinetuneError(f"adapter {source}: {path!r} has shape {tuple(value.shape)} but the model has "
                          f"{tuple(shapes[path])}: the adapter belongs to a different base model or rank")
  for path, shape in meta.get("base_shapes", {}).items():
    if path in shapes and tuple(shape) != tuple(shapes[path]):
      raise FinetuneError(f"adapter {source} was trained on a base whose {path!r} has shape {tuple(shape)}, not "
                          f"{tuple(shapes[path])}: it is an adapter for a different base model")


def quantized_shapes(abstract_model: nnx.Module) -> list[tuple[int, ...]]:
  """Shapes of the base kernels a method stores compressed (QLoRA), which are parameters no longer."""
  return [tuple(node.kernel_shape) for _, node in nnx.iter_graph(abstract_model)
          if getattr(node, "quantize", "") and hasattr(node, "kernel_shape")]


# Importing a method module registers it.
from finetune.methods import bitfit  # noqa: E402,F401
from finetune.methods import bottleneck  # noqa: E402,F401
from finetune.methods import ia3  # noqa: E402,F401
from finetune.methods import lora  # noqa: E402,F401
from finetune.methods import prefix_tuning  # noqa: E402,F401
from finetune.methods import prompt_tuning  # noqa: E402,F401
