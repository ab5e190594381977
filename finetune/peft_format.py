"""LoRA adapters in Hugging Face PEFT's format, both ways.

`export_peft` writes `adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained`
loads onto the transformers model our Hugging Face export (or the original checkpoint) gives; `read_peft_adapter`
reads such a folder (made by PEFT in PyTorch) into our parameter paths. The facts that must be exact, and that a
wrong guess would hide (a mis-named key loads silently as "missing", leaving lora_B = 0):

* keys are `base_model.model.<transformers module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), whatever
  the base layer's own layout (GPT-2's Conv1D stores its weight (in, out); PEFT marks that with
  `fan_in_fan_out`, which changes how the base weight is read, not the LoRA factors); DoRA adds
  `.lora_magnitude_vector` (out,); `modules_to_save` tensors appear under their plain transformers names; GPT-2's
  c_attn orders its outputs head by head here (finetune/models/gpt2.py), so its lora_B and magnitudes are
  reordered to transformers' order and back;
* module names are those of the transformers *classes* that load the adapter, which may differ from the names
  inside checkpoint files: transformers 5 loads ViT checkpoints written with 4.x names
  (`vit.encoder.layer.0.attention.attention.query`) into modules named `vit.layers.0.attention.q_proj`, renaming
  on load (its `conversion_mapping`). Export applies the installed transformers' renames; import accepts both.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from finetune import adapters
from finetune.errors import FinetuneError
from finetune.files import read_json, save_safetensors
from finetune.methods.lora import LoRALinear, lora_modules
from finetune.models import hf
from finetune.reporting import staged_directory

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Our model -> (the transformers base-model class whose renames apply, the prefix its modules sit under).
_BASE_CLASSES = {"bert": ("BertModel", "bert."), "vit": ("ViTModel", "vit."), "gpt2": ("GPT2Model", "transformer."),
                 "llama": ("LlamaModel", "model.")}


def is_peft_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, PEFT_CONFIG)) and os.path.isfile(os.path.join(path, PEFT_WEIGHTS))


def _renames(model_name: str) -> list[tuple[str, str, str]]:
  """[(scope prefix, source regex, target)] module renames the installed transformers applies on load."""
  try:
    from transformers import conversion_mapping  # pylint: disable=g-import-not-at-top
  except ImportError:  # transformers 4.x: module names are the checkpoint names
    return []
  class_name, scope = _BASE_CLASSES[model_name]
  renames = []
  for transform in conversion_mapping.get_checkpoint_conversion_mapping(class_name) or []:
    if type(transform).__name__ != "WeightRenaming":
      continue
    for source, target in zip(transform.source_patterns, transform.target_patterns):
      renames.append((scope, source, target))
  return renames


def module_name(model_name: str, param_name: str, naming: str = "installed") -> str:
  """The transformers module holding tensor `param_name` (a checkpoint name), as the installed transformers names
  it (`naming='installed'`) or as checkpoint files name it (`naming='checkpoint'`)."""
  module = param_name.rsplit(".", 1)[0]
  if naming == "checkpoint":
    return module
  if naming != "installed":
    raise ValueError(f"naming must be 'installed' or 'checkpoint', got {naming!r}")
  for scope, source, target in _renames(model_name):
    if module.startswith(scope):
      module = scope + re.sub(source, target, module[len(scope):])
  return module


def _model_kwargs(model_cfg: ConfigDict, num_classes: int) -> dict[str, Any]:
  from finetune.models import full_model_kwargs  # pylint: disable=g-import-not-at-top
  return full_model_kwargs(model_cfg, num_classes)


def _tied_embedding(model_name: str, abstract_model: nnx.Module) -> str | None:
  """Our path of an input embedding that is also the output layer (GPT-2; Llama with tied embeddings), else None.
  transformers ties `lm_head.weight` to it, but PEFT's modules_to_save wraps a *copy* of the embedding: the
  output layer would keep the old weights unless `lm_head` is saved too."""
  if model_name == "gpt2":
    return "wte/embedding"
  if model_name == "llama" and getattr(abstract_model, "lm_head", None) is None:
    return "embed_tokens/embedding"
  return None


def saves_classifier(model_name: str, kwargs: dict[str, Any]) -> bool:
  """Whether the adapter carries a classifier the base model must have room for (BERT with cls pooling, ViT)."""
  return model_name == "vit" or _task_type(model_name, kwargs) == "SEQ_CLS"


def _task_type(model_name: str, kwargs: dict[str, Any]) -> str | None:
  if model_name in ("gpt2", "llama"):
    return "CAUSAL_LM"
  if model_name == "bert":
    return "SEQ_CLS" if kwargs.get("pooling", "cls") == "cls" else "FEATURE_EXTRACTION"
  return None  # PEFT has no image-classification task type; modules_to_save carries the head


def export_peft(model_cfg: ConfigDict, peft_cfg: ConfigDict, abstract_model: nnx.Module, params: dict[str, Any],
                trainable: list[str], num_classes: int, out: str, base_model: str = "",
                naming: str = "installed") -> dict[str, Any]:
  """Writes a PEFT LoRA adapter folder for the adapted model's flat `params` (atomically); returns adapter_config.

  A QLoRA run's adapter is written the same way; PEFT applies it to the float base (or to a bitsandbytes 4-bit
  one), whose outputs differ from our NF4 base by the quantisation error."""
  tensors, config = peft_adapter(model_cfg, peft_cfg, abstract_model, params, trainable, num_classes, base_model,
                                 naming)
  with staged_directory(out) as staging:
    write_adapter(staging, tensors, config)
  return config


def write_adapter(directory: str, tensors: dict[str, np.ndarray], config: dict[str, Any]) -> None:
  """PEFT's two files of an adapter, into an existing folder."""
  save_safetensors(tensors, os.path.join(directory, PEFT_WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(directory, PEFT_CONFIG), "w") as f:
    json.dump(config, f, indent=2)


def peft_adapter(model_cfg: ConfigDict, peft_cfg: ConfigDict, abstract_model: nnx.Module, params: dict[str, Any],
                 trainable: list[str], num_classes: int, base_model: str = "",
                 naming: str = "installed") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(adapter_model tensors, adapter_config) in PEFT's names for a LoRA run (see `export_peft`)."""
  if peft_cfg.method != "lora":
    raise FinetuneError(f"PEFT's format holds LoRA adapters (and DoRA, rsLoRA); config.peft.method is "
                        f"{peft_cfg.method!r}")
  name = model_cfg.name
  if name not in _BASE_CLASSES:
    raise FinetuneError(f"model {name!r} has no transformers counterpart; PEFT export supports "
                        f"{', '.join(_BASE_CLASSES)}")
  kwargs = _model_kwargs(model_cfg, num_classes)
  if name == "bert" and kwargs.get("position_offset") and kwargs.get("pooling", "cls") == "cls":
    # RobertaForSequenceClassification names its encoder `roberta` and has a two-layer classifier: an adapter in
    # BERT's names would fail to load in PEFT (as --format hf refuses RoBERTa-style models).
    raise FinetuneError("PEFT export of a RoBERTa-style classifier (position offsets) is not supported yet; "
                        "export a BERT model, or use pooling='mean' (the base is then the encoder alone)")
  loras, task_type = lora_modules(abstract_model), _task_type(name, kwargs)
  if task_type == "SEQ_CLS" and any(path.split("/")[0] == "head" for path in loras):
    # PEFT's SEQ_CLS task always wraps the classifier in modules_to_save: a LoRA layer there was written both ways
    # (or refused for its head bias), and PEFT failed to load it.
    raise FinetuneError("this run puts LoRA on the classifier (config.peft.targets matches head/), which PEFT's "
                        "sequence-classification format cannot hold (it saves the classifier whole); use --format "
                        "hf, which merges it, or train the head fully (config.peft.modules_to_save=('^head/',))")
  tensors, modules, ranks, alphas = {}, {}, {}, {}
  for path, module in loras.items():
    hf_param, kernel_layout = hf.transformers_name(name, f"{path}/kernel", kwargs)
    module_path = module_name(name, hf_param, naming)
    modules[path] = module_path
    ranks[module_path], alphas[module_path] = module.rank, module.alpha
    tensors[f"{PREFIX}{module_path}.lora_A.weight"] = np.ascontiguousarray(np.asarray(params[f"{path}/lora_a"]).T)
    # lora_B (r, out) and the magnitudes (out,) run along the layer's outputs, in transformers' order there.
    tensors[f"{PREFIX}{module_path}.lora_B.weight"] = np.ascontiguousarray(
        hf.output_to_torch(np.asarray(params[f"{path}/lora_b"]), kernel_layout).T)
    if module.dora:
      tensors[f"{PREFIX}{module_path}.lora_magnitude_vector"] = hf.output_to_torch(
          np.asarray(params[f"{path}/lora_magnitude"]), kernel_layout)
  adapter_paths = {f"{p}/{leaf}" for p in modules for leaf in ("lora_a", "lora_b", "lora_magnitude")}
  saved_modules, biases = [], []
  if task_type == "SEQ_CLS":  # PEFT always wraps the classifier of a SEQ_CLS model and expects its weights
    trainable = sorted(set(trainable) | {p for p in params if p.startswith("head/")})
  if task_type == "FEATURE_EXTRACTION":  # a mean-pooled BERT exports as BertModel, which has no classifier
    trainable = [p for p in trainable if not p.startswith("head/")]
  for path in trainable:
    if path in adapter_paths:
      continue
    hf_param, layout = hf.transformers_name(name, path, kwargs)
    leaf = hf_param.rsplit(".", 1)[1]
    if path.endswith("/bias") and path.rsplit("/", 1)[0] in modules:  # bias of a LoRA layer (bias=lora_only/all)
      biases.append(path)
      leaf = "base_layer.bias"  # PEFT saves and loads a wrapped layer's bias there; '<module>.bias' it ignores
    elif path.endswith("/bias") and peft_cfg.bias == "all" and not any(re.search(p, path)
                                                                       for p in peft_cfg.modules_to_save):
      biases.append(path)
    else:
      saved_modules.append(module_name(name, hf_param, naming))
    tensors[PREFIX + module_name(name, hf_param, naming) + "." + leaf] = hf.to_torch_layout(params[path], layout)
  tied = _tied_embedding(name, abstract_model)
  if tied in trainable:  # (without it PEFT's logits came from the untrained output layer: off by more than the base)
    saved_modules.append("lm_head")
    tensors[f"{PREFIX}lm_head.weight"] = hf.to_torch_layout(params[tied], hf.transformers_name(name, tied, kwargs)[1])
  if biases and peft_cfg.bias == "none":
    raise FinetuneError(f"biases {biases[:3]} trained but config.peft.bias='none'; PEFT could not load them")
  # target_modules: the leaf names when they pick exactly the adapted modules in the transformers model, else full
  # module paths (PEFT matches a target t against module names equal to t or ending in '.t').
  all_linear = {module_name(name, hf.transformers_name(name, f"{p}/kernel", kwargs)[0], naming)
                for p, _ in adapters.module_paths(abstract_model, (nnx.Linear, LoRALinear))}
  if task_type == "FEATURE_EXTRACTION":  # BertModel has a pooler our mean-pooled BERT lacks ('dense' matched it)
    all_linear.add("pooler.dense")
  leaves = sorted({m.rsplit(".", 1)[-1] for m in modules.values()})
  if {m for m in all_linear if m.rsplit(".", 1)[-1] in leaves} == set(modules.values()):
    target_modules = leaves
  else:
    target_modules = sorted(modules.values())
  rank, alpha = int(peft_cfg.rank), float(peft_cfg.alpha)
  config = {
      "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model or None,
      "r": rank, "lora_alpha": alpha, "lora_dropout": float(peft_cfg.dropout), "use_rslora": bool(peft_cfg.rslora),
      "use_dora": bool(peft_cfg.dora), "target_modules": target_modules,
      "modules_to_save": sorted(set(saved_modules)) or None, "bias": peft_cfg.bias,
      "fan_in_fan_out": name == "gpt2",  # GPT-2's Conv1D stores weights (in, out)
      "init_lora_weights": True, "inference_mode": True,
      "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != rank},
      "alpha_pattern": {re.escape(m): a for m, a in alphas.items() if a != alpha},
      "layers_to_transform": None, "layers_pattern": None, "revision": None,
  }
  return tensors, config


def read_peft_adapter(directory: str, model_cfg: ConfigDict, peft_cfg: ConfigDict, abstract_model: nnx.Module,
                      num_classes: int) -> dict[str, np.ndarray]:
  """A PEFT LoRA folder -> {our parameter path: array} for the adapted `abstract_model`.

  The adapter's r / lora_alpha / use_rslora / use_dora must equal config.peft's (per module, after rank and alpha
  patterns), or the outputs would differ silently: a mismatch is an error naming both values.
  """
  config = read_json(os.path.join(directory, PEFT_CONFIG), "save or download the adapter again")
  if not isinstance(config, dict):
    raise FinetuneError(f"{os.path.join(directory, PEFT_CONFIG)} is not a PEFT adapter config (a JSON object)")
  if config.get("peft_type", "LORA") != "LORA":
    raise FinetuneError(f"{directory} is a {config.get('peft_type')} adapter; only LoRA adapters can be imported")
  if config.get("lora_bias"):  # (its lora_B.bias tensors were reported as belonging to another architecture)
    raise FinetuneError(f"{directory} was trained with PEFT's lora_bias=True (a bias on every lora_B), which our LoRA "
                        "layers do not have; import adapters trained with lora_bias=False")
  name = model_cfg.name
  if name not in _BASE_CLASSES:  # (a KeyError deep in the name mapping)
    raise FinetuneError(f"config.peft.load_adapter: model {name!r} has no transformers counterpart, so a PEFT "
                        f"adapter cannot name its layers; PEFT import supports {', '.join(_BASE_CLASSES)}")
  tensors = hf.load_safetensors(os.path.join(directory, PEFT_WEIGHTS), "save or download the adapter again")
  kwargs = _model_kwargs(model_cfg, num_classes)
  loras = lora_modules(abstract_model)
  # Every module name a transformers version may use for each of our LoRA layers and trainable tensors.
  by_module: dict[str, str] = {}
  kernel_layouts: dict[str, Any] = {}  # our LoRA path -> its kernel's layout (lora_B and magnitudes follow it)
  for path in loras:
    hf_param, kernel_layouts[path] = hf.transformers_name(name, f"{path}/kernel", kwargs)
    for naming in ("installed", "checkpoint"):
      for alias in _with_and_without_scope(name, module_name(name, hf_param, naming)):
        by_module[alias] = path
  by_param: dict[str, tuple[str, Any]] = {}
  for path, _ in _flat_paths(abstract_model):
    try:
      hf_param, layout = hf.transformers_name(name, path, kwargs)
    except FinetuneError:
      continue
    leaf = hf_param.rsplit(".", 1)[1]
    for naming in ("installed", "checkpoint"):
      for alias in _with_and_without_scope(name, module_name(name, hf_param, naming)):
        by_param.setdefault(f"{alias}.{leaf}", (path, layout))
  tied = _tied_embedding(name, abstract_model)
  if tied:  # a tied model's output layer is its embedding: PEFT saves both when modules_to_save wraps them
    by_param["lm_head.weight"] = (tied, hf.transformers_name(name, tied, kwargs)[1])
  arrays: dict[str, np.ndarray] = {}
  read_from: dict[str, list[str]] = {}  # our path -> the adapter tensors it was read from
  # {our LoRA path: the module name the adapter used for it}: its rank/alpha patterns name modules that way (a
  # pattern in one naming would not match the other's aliases).
  used_names: dict[str, str] = {}
  for key, value in tensors.items():
    short = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if ".original_module." in short:  # the frozen original of a modules_to_save layer (bias='all' saves its bias)
      continue
    short = re.sub(r"\.modules_to_save(\.\w+)?\.", ".", short).replace(".base_layer.", ".")
    match = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)", short)
    if match:
      module, part = match.groups()
      if module not in by_module:
        ours = sorted(loras)
        raise FinetuneError(f"adapter {directory}: {key} adapts module {module!r}, which has no LoRA layer in this "
                            f"model (config.peft.targets puts LoRA on {', '.join(ours[:3])}"
                            f"{', ...' if len(ours) > 3 else ''}); set config.peft.targets to the layers the adapter "
                            "adapts, in this model's layer names")
      path = by_module[module]
      used_names[path] = module
      if part == "lora_A.weight":
        arrays[f"{path}/lora_a"] = np.ascontiguousarray(value.T)
      elif part == "lora_B.weight":
        arrays[f"{path}/lora_b"] = hf.output_from_torch(np.ascontiguousarray(value.T), kernel_layouts[path])
      else:
        arrays[f"{path}/lora_magnitude"] = hf.output_from_torch(value, kernel_layouts[path])
    elif short in by_param:
      path, layout = by_param[short]
      array = hf.from_torch_layout(value, layout)
      if path in arrays and not np.array_equal(arrays[path], array):
        untie = ", or untie the model's embeddings (config.model.tie_word_embeddings=False)" if name == "llama" else ""
        raise FinetuneError(f"adapter {directory}: {read_from[path][0]} and {key} differ, but this model ties them "
                            f"into one parameter ({path}); import an adapter that saves them equal{untie}")
      arrays[path] = array
      read_from.setdefault(path, []).append(key)
    else:
      raise FinetuneError(f"adapter {directory}: tensor {key} has no counterpart in model {name!r}; the adapter "
                          "belongs to another architecture")
  if len(read_from.get(tied, ())) == 1:
    # PEFT wrapped a copy of one of the two and left the other with its base weights: an untied model, which ours
    # (one parameter for both) cannot be; read as it was, the logits differed from PEFT's by more than the base's.
    raise FinetuneError(f"adapter {directory}: {read_from[tied][0]} is saved without the layer this model ties it to "
                        f"(the input embedding and lm_head are one parameter here, {tied}), so in PEFT the other "
                        "keeps its base weights; import an adapter whose modules_to_save holds both, equal (as "
                        "`finetune export --format peft` writes them)")
  _check_scaling(config, peft_cfg, loras, used_names, directory)
  return arrays


def _with_and_without_scope(model_name: str, module: str) -> tuple[str, ...]:
  """A module's name as the task model names it (`bert.encoder...`) and as the bare base model does
  (`encoder...`): an adapter made on the other class (PEFT on BertForSequenceClassification, imported into a
  mean-pooled BERT, which exports as BertModel) holds the same layers under the other name."""
  scope = _BASE_CLASSES[model_name][1]
  if module.startswith(scope):
    return module, module[len(scope):]
  if module.split(".")[0] in ("lm_head", "classifier"):  # the task model's own layers, outside the base model
    return (module,)
  return module, scope + module


def _flat_paths(abstract_model: nnx.Module) -> list[tuple[str, Any]]:
  from finetune.partition import flatten  # pylint: disable=g-import-not-at-top
  return list(flatten(nnx.state(abstract_model, nnx.Param).to_pure_dict()).items())


def _check_scaling(config: dict[str, Any], peft_cfg: ConfigDict, loras: dict[str, LoRALinear],
                   used_names: dict[str, str], directory: str) -> None:
  for key, ours in (("use_rslora", peft_cfg.rslora), ("use_dora", peft_cfg.dora)):
    if bool(config.get(key, False)) != bool(ours):
      raise FinetuneError(f"adapter {directory} has {key}={config.get(key)} but config.peft.{key[4:]}={ours}; "
                          f"set config.peft.{key[4:]}={bool(config.get(key))}")
  for path, module in used_names.items():
    rank = _pattern(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    layer = loras[path]
    if (int(rank), float(alpha)) != (layer.rank, layer.alpha):
      raise FinetuneError(f"adapter {directory}: module {module} has r={rank}, lora_alpha={alpha} but this model's "
                          f"LoRA layer {path} has rank={layer.rank}, alpha={layer.alpha}; set config.peft.rank / "
                          "alpha (or rank_pattern / alpha_pattern) to the adapter's")


# Settings that change what an adapter's tensors compute (rank is checked by their shapes), as a PEFT folder's are
# by `_check_scaling`: the same tensors under another alpha, rsLoRA or DoRA give another model.
# (IA)^3's feedforward: which targets scale their input rather than their output; on a square layer the vector fits
# either way, so only the setting tells them apart.
_FUNCTIONAL_SETTINGS = ("method", "alpha", "rslora", "dora", "alpha_pattern", "rank_pattern", "feedforward")


def _check_settings(saved: dict[str, Any], peft_cfg: ConfigDict, directory: str) -> None:
  ours = json.loads(json.dumps(peft_cfg.to_dict(), default=list))  # tuples as the saved JSON has them: lists
  for key in _FUNCTIONAL_SETTINGS:
    if key in saved and key in ours and saved[key] != ours[key]:
      raise FinetuneError(f"adapter {directory} was trained with peft.{key}={saved[key]!r} but config.peft.{key}="
                          f"{ours[key]!r}; set config.peft.{key} to the adapter's value")


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
  # PEFT: the first pattern p with re.match(rf"(.*\.)?{p}$", module) (see peft.tuners.tuners_utils).
  for pattern, value in patterns.items():
    if re.match(rf"(.*\.)?({pattern})$", module):
      return value
  return default


def read_any_adapter(path: str, model_cfg: ConfigDict, peft_cfg: ConfigDict, abstract_model: nnx.Module,
                     num_classes: int) -> tuple[dict[str, np.ndarray], str]:
  """Our adapter folder (`<run>/adapter`, or the run directory) or a PEFT folder -> ({path: array}, resolved
  source), checked against the adapted model: an adapter for another base model or rank is an error naming why."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, "adapter")) and not adapters.is_adapter_dir(path):
    path = os.path.join(path, "adapter")  # a run directory
  if adapters.is_adapter_dir(path):
    meta, arrays = adapters.load_adapter(path)
    if meta.get("model", {}).get("name") not in (None, model_cfg.name):
      raise FinetuneError(f"adapter {path} was made for model {meta['model']['name']!r}, not {model_cfg.name!r}")
    _check_settings(meta.get("peft", {}), peft_cfg, path)
  elif is_peft_dir(path):
    meta, arrays = {}, read_peft_adapter(path, model_cfg, peft_cfg, abstract_model, num_classes)
  else:
    raise FinetuneError(f"{path} is neither an adapter folder ({adapters.ADAPTER_WEIGHTS} + {adapters.ADAPTER_CONFIG})"
                        f" nor a PEFT adapter ({PEFT_WEIGHTS} + {PEFT_CONFIG}); check config.peft.load_adapter")
  shapes = {p: tuple(x.shape) for p, x in _flat_paths(abstract_model)}
  adapters.check_adapter_fits(meta, arrays, shapes, path)
  return dict(arrays), path
