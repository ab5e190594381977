"""Model zoo: one file per model, found by name in `MODELS`.

The contract of a model class (an `nnx.Module` registered with `@MODELS.register(name)`):
  * constructor: keyword arguments from `config.model` (less `name`), plus `num_classes` and `rngs`;
  * `__call__(x, *, train=False, rngs=None) -> logits` and `embed(x, *, train=False, rngs=None) -> features`
    (the input to the head, for feature extraction); dropout draws from the `rngs` passed at call time, so the
    model holds no RNG state and the train step stays a pure function;
  * `layer_groups() -> [(group_name, regex over parameter paths), ...]` ordered input to output, covering every
    parameter exactly once; the classifier is the group `head` with parameters under `head/`;
  * every parameter carries logical axis names (see `layers.py`); `sharding.py` maps them to mesh axes;
  * BatchNorm layers are applied through `layers.normalize`, so a strategy can freeze them (inference mode).
"""

from __future__ import annotations

import inspect
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


def check_arguments(name: str, keys) -> None:
  """Every key must be an argument of model `name`'s constructor (the config check runs this before any stage
  trains, so a typo in a later stage's config.model does not surface after the earlier stages' training)."""
  accepted = [p for p in inspect.signature(MODELS.get(name).__init__).parameters if p not in ("self", "rngs")]
  for key in keys:
    if key not in accepted:
      raise FinetuneError(f"config.model.{key} is not an argument of model {name!r}; "
                          f"valid: {', '.join(a for a in accepted if a != 'num_classes')}")


def model_kwargs(model_cfg: ConfigDict, num_classes: int) -> dict[str, Any]:
  """Constructor kwargs from `config.model`, checked against the model's signature."""
  MODELS.get(model_cfg.name)  # an unknown name fails first, listing the valid ones
  kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
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
    kwargs = {**hf_kwargs, **kwargs}
  check_arguments(model_cfg.name, kwargs)
  if "num_classes" in kwargs and kwargs["num_classes"] != num_classes:
    raise FinetuneError(f"config.model.num_classes={kwargs['num_classes']} but the data has {num_classes} classes; "
                        "drop config.model.num_classes (it is taken from the data) or change config.data.classes")
  kwargs["num_classes"] = num_classes
  return kwargs


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
