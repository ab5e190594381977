"""Model zoo: one file per model, found by name in `MODELS`.

The contract of a model class (an `nnx.Module` registered with `@MODELS.register(name)`):
  * constructor: keyword arguments from `config.model` (less `name`), plus `num_classes` and `rngs`;
  * `__call__(x, *, train=False, rngs=None) -> logits` and `embed(x, *, train=False, rngs=None) -> features`
    (the input to the head, for feature extraction); dropout draws from the `rngs` passed at call time, so the
    model holds no RNG state and the train step stays a pure function;
  * `layer_groups() -> [(group_name, regex over parameter paths), ...]` ordered input to output, covering every
    parameter exactly once; the last group is `head`, the output side (a classifier's `head/`, a language
    model's final norm and output layer);
  * every parameter carries logical axis names (see `layers.py`); `sharding.py` maps them to mesh axes;
  * BatchNorm layers are applied through `layers.normalize`, so a strategy can freeze them (inference mode);
  * optional class attribute `layout_changes`: ((format, regex over parameter paths, what changed), ...) for each
    checkpoint format (`scan.FORMAT`) that changed how this model stores a parameter; readers refuse older weights
    that match (`refuse_changed_layout`), which would otherwise load without error and compute something else.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from flax import nnx
from ml_collections import ConfigDict

from finetune.errors import FinetuneError
from finetune.registry import Registry

MODELS: Registry[type[nnx.Module]] = Registry("model")

# Importing a model module registers it.
from finetune.models import bert  # noqa: E402,F401
from finetune.models import cnn  # noqa: E402,F401
from finetune.models import gpt2  # noqa: E402,F401
from finetune.models import llama  # noqa: E402,F401
from finetune.models import lstm  # noqa: E402,F401
from finetune.models import mlp  # noqa: E402,F401
from finetune.models import vit  # noqa: E402,F401


def refuse_changed_layout(paths: Any, stored_format: int, source: str, fix: str) -> None:
  """Raises where weights of checkpoint format `stored_format` (parameter `paths`, read from `source`) hold a
  parameter whose stored layout a later format changed (a model's `layout_changes`). The paths alone decide: a
  checkpoint does not always say which model wrote it (a step folder copied away from its run)."""
  for name in MODELS.names():
    for since, pattern, change in getattr(MODELS.get(name), "layout_changes", ()):
      if stored_format < since and any(re.search(pattern, path) for path in paths):
        raise FinetuneError(f"{source} holds {name} weights saved in checkpoint format {stored_format}, before "
                            f"format {since} {change}; they would now load scrambled: {fix}")


def check_arguments(name: str, keys) -> None:
  """Every key must be an argument of model `name`'s constructor (the config check runs this before any stage
  trains, so a typo in a later stage's config.model does not surface after the earlier stages' training)."""
  accepted = [p for p in inspect.signature(MODELS.get(name).__init__).parameters if p not in ("self", "rngs")]
  for key in keys:
    if key not in accepted:
      raise FinetuneError(f"config.model.{key} is not an argument of model {name!r}; "
                          f"valid: {', '.join(a for a in accepted if a != 'num_classes')}")


def check_argument_types(name: str, kwargs: dict[str, Any], read_from: dict[str, str] | None = None) -> None:
  """Each value against its constructor annotation (`int`, `float`, `tuple[int, ...]`, `str | None`, ...): a
  string dropout or a fractional width failed inside the model as a TypeError traceback. `read_from` names the
  file and key a value came from (a checkpoint's config.json), which the message then blames instead of
  config.model."""
  parameters = inspect.signature(MODELS.get(name).__init__).parameters
  for key, value in kwargs.items():
    annotation = parameters[key].annotation if key in parameters else inspect.Parameter.empty
    if isinstance(annotation, str) and _fits(value, annotation) is False:
      if read_from and key in read_from:
        raise FinetuneError(f"{read_from[key]}={value!r} (config.model.{key}) is not {annotation} (model {name!r}); "
                            f"fix that file or set config.model.{key}, which wins over it")
      raise FinetuneError(f"config.model.{key}={value!r} is not {annotation} (model {name!r}); give a value of "
                          "that type")


def _fits(value: Any, annotation: str) -> bool | None:
  """Whether `value` fits a simple annotation; None where the annotation is not one this reads."""
  verdicts = []
  for option in (part.strip() for part in annotation.split("|")):
    if option.startswith("tuple[") and option.endswith(", ...]"):
      inner = [_fits(v, option[len("tuple["):-len(", ...]")]) for v in value] \
          if isinstance(value, (tuple, list)) else [False]
      verdicts.append(None if None in inner else all(inner))
    else:
      check = {"None": lambda v: v is None, "bool": lambda v: isinstance(v, bool),
               "str": lambda v: isinstance(v, str),
               "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
               "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}.get(option)
      verdicts.append(None if check is None else check(value))
  return True if True in verdicts else None if None in verdicts else False


def model_kwargs(model_cfg: ConfigDict, num_classes: int) -> dict[str, Any]:
  """Constructor kwargs from `config.model`, checked against the model's signature."""
  MODELS.get(model_cfg.name)  # an unknown name fails first, listing the valid ones
  kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  read_from: dict[str, str] = {}  # argument -> where a checkpoint's config.json gave it, for the type check
  if kwargs.get("hf_config"):
    # Architecture from a Hugging Face config.json; keys set in config.model win.
    from finetune.models import hf  # pylint: disable=g-import-not-at-top
    hf_path = hf.resolve_hf(kwargs["hf_config"])
    hf_name, hf_kwargs = hf.model_kwargs(hf_path)
    if hf_name != model_cfg.name:
      raise FinetuneError(f"config.model.hf_config is a {hf_name!r} checkpoint but config.model.name is "
                          f"{model_cfg.name!r}; set config.model.name={hf_name!r}")
    rates = hf.dropout_rates(hf_path)
    if rates and "dropout" not in kwargs:  # the checkpoint's dropout, as transformers would train it
      if len(set(rates.values())) > 1:
        raise FinetuneError(f"{hf_path}/config.json sets dropout rates {rates}, but model {hf_name!r} has one rate "
                            "for all of them: set config.model.dropout")
      hf_kwargs["dropout"] = next(iter(rates.values()))
    theirs = hf.config_keys(hf_path)  # (values derived from several keys are named by ours)
    read_from = {key: f"{hf_path}/config.json's {theirs.get(key, key)}" for key in hf_kwargs if key not in kwargs}
    if "layer_types" in hf_kwargs and "layer_types" not in kwargs and "num_hidden_layers" in kwargs:
      # The checkpoint's per-layer attention follows the layers loaded (config.model keeps the first ones).
      hf_kwargs["layer_types"] = hf_kwargs["layer_types"][:kwargs["num_hidden_layers"]]
    kwargs = {**hf_kwargs, **kwargs}
  check_arguments(model_cfg.name, kwargs)
  check_argument_types(model_cfg.name, kwargs, read_from)
  if "num_classes" in kwargs and kwargs["num_classes"] != num_classes:
    raise FinetuneError(f"config.model.num_classes={kwargs['num_classes']} but the data has {num_classes} classes; "
                        "drop config.model.num_classes (it is taken from the data) or change config.data.classes")
  kwargs["num_classes"] = num_classes
  return kwargs


def full_model_kwargs(model_cfg: ConfigDict, num_classes: int) -> dict[str, Any]:
  """Every constructor argument of the model: its defaults, overridden by what the config set."""
  signature = inspect.signature(MODELS.get(model_cfg.name).__init__)
  defaults = {name: p.default for name, p in signature.parameters.items()
              if p.default is not inspect.Parameter.empty}
  return {**defaults, **model_kwargs(model_cfg, num_classes)}


# Constructor arguments a checkpoint may have more of than the model uses (its first layers are loaded), and the
# pooling, which is this model's choice, not the checkpoint's.
_NOT_THE_CHECKPOINT_S = ("num_layers", "n_layer", "num_hidden_layers", "depth", "pool")


def check_hf_architecture(model_cfg: ConfigDict, num_classes: int, checkpoint: str) -> None:
  """A Hugging Face checkpoint's settings that no tensor carries (RoBERTa's position offset, norm epsilons, the
  rotary base) must be the model's: shapes cannot catch a model built otherwise, which computes another function
  (a RoBERTa sized by hand, without hf_config, was 2.45 off transformers' outputs)."""
  from finetune.models import hf  # pylint: disable=g-import-not-at-top
  name, architecture = hf.model_kwargs(checkpoint)
  if name != model_cfg.name:
    raise FinetuneError(f"init_from {checkpoint} is a {name!r} checkpoint but config.model.name is "
                        f"{model_cfg.name!r}; set config.model.name={name!r}")
  ours = full_model_kwargs(model_cfg, num_classes)
  differing = [key for key, value in architecture.items()
               if key not in _NOT_THE_CHECKPOINT_S and key in ours and ours[key] != value]
  if differing:
    raise FinetuneError(f"init_from {checkpoint} has {', '.join(f'{k}={architecture[k]!r}' for k in differing)} "
                        f"but config.model has {', '.join(f'{k}={ours[k]!r}' for k in differing)}, so the loaded "
                        f"weights would compute another function; set config.model.hf_config={checkpoint} (it reads "
                        "them from the checkpoint's config.json) and drop those keys from config.model")


def vocab_size(model_cfg: ConfigDict, num_classes: int) -> int | None:
  """The token vocabulary of a text model as configured (config.model, hf_config, or the constructor's default);
  None for models that read no token ids."""
  parameter = inspect.signature(MODELS.get(model_cfg.name).__init__).parameters.get("vocab_size")
  if parameter is None:
    return None
  return int(model_kwargs(model_cfg, num_classes).get("vocab_size", parameter.default))


def build_model(model_cfg: ConfigDict, num_classes: int, rngs: nnx.Rngs) -> nnx.Module:
  """Constructs the model named by `config.model.name`. Wrap in `nnx.eval_shape` to get shapes only."""
  cls = MODELS.get(model_cfg.name)
  kwargs = model_kwargs(model_cfg, num_classes)
  # Shardings are applied by finetune.sharding from the logical names, not eagerly by flax at creation.
  with nnx.use_eager_sharding(False):
    return cls(**kwargs, rngs=rngs)
