"""Experiment configs: loading `configs/x.py[:arg]`, `--config.key=value` overrides, validation and stages.

An experiment file defines `get_config(arg=None) -> ConfigDict` holding only what differs from `defaults()`.
Loading merges it over the defaults with strict keys and types (a typo anywhere is an error naming the key and
the valid ones), applies command-line overrides the same way, expands stages, validates, and locks the result.

Two sections are open: `model` and `data.options` hold keyword arguments for the model class / data source
chosen by name, so their keys are checked against that constructor's signature instead of against defaults.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
from typing import Any, Callable, Iterable, Sequence

import ml_collections
from ml_collections import ConfigDict  # re-exported for config files

from finetune.errors import FinetuneError, raised_at

# Dotted paths whose keys are constructor kwargs, validated against the constructor at build time.
OPEN_SECTIONS = ("model", "data.options")


def defaults() -> ConfigDict:
  """Every config key with its default. The README's "Config reference" table describes each."""
  c = ConfigDict()
  c.seed = 0
  # Added to `seed` for the stage that sets it (stage_configs resolves it: a stage's config.json records the seed
  # it ran with and an offset of 0). Lets stages differ in seed while `--config.seed` (and a sweep's seed axis)
  # still moves every stage: e.g. re-initialised layers of a transfer stage not starting from its source's init.
  c.seed_offset = 0
  c.task = "classification"
  c.model = ConfigDict({"name": "cnn"})
  c.data = ConfigDict({
      "name": "mnist",
      "path": "",
      "cache_dir": os.path.join("~", ".cache", "finetune"),
      "options": ConfigDict(),
      "classes": (),
      "validation_fraction": 0.1,
      # Carve validation_fraction from each class alone, so that 'validation' and 'train' hold every class in its
      # share of the training split (a small labelled subset, 'train' at a large fraction, keeps every class).
      "stratify": False,
      "eval_splits": ("validation", "test"),
      "batch_size": 128,
      "eval_batch_size": 500,
      "augment": ConfigDict({"crop_padding": 0, "flip": False}),
  })
  c.train = ConfigDict({
      "steps": 0,
      "epochs": 0.0,
      "log_every": 50,
      "eval_every": 0,
      "checkpoint_every": 500,
      "keep_checkpoints": 2,
      # A CRC-32 of every checkpoint file, checked whenever the step is read (finetune/checkpoint.py); off saves
      # reading each checkpoint back once after it is written (about 2 GB/s on one core).
      "checkpoint_checksums": True,
      "label_smoothing": 0.0,
      # Gradient accumulation: each batch runs as this many micro-batches inside one step (same update, less
      # activation memory).
      "grad_accum_steps": 1,
      # Mixed precision: 'bfloat16' runs forward and backward on bfloat16 copies of the float32 master weights.
      "compute_dtype": "float32",
      # Under bfloat16 compute, parameters whose paths match these regexes stay float32 in the forward pass too
      # (e.g. norms or embeddings, where bfloat16 rounding hurts most).
      "float32_params": (),
      # Rematerialisation per block: '' (off), 'block' (keep each block's input only) or 'dots' (keep matmuls).
      "remat": "",
      # Scanned layers: the model's block stack stored with a leading layer axis and run by jax.lax.scan, so
      # compile time does not grow with depth (finetune/scan.py). Strategies and checkpoints stay per layer.
      "scan_layers": False,
      # Stop when `metric` ('<split>/<key>', e.g. 'validation/accuracy'; evaluated every eval_every steps) has not
      # improved for `patience` evaluations, and end the stage on its best checkpoint.
      "early_stopping": ConfigDict({"metric": "", "patience": 0, "mode": "max"}),
      # After the stage, evaluate the earlier tasks of its lineage (init_from chain) with its backbone: forgetting.
      "evaluate_sources": True,
  })
  c.optimizer = ConfigDict({
      "name": "adamw",
      "learning_rate": 1e-3,
      "schedule": "cosine",
      "warmup_steps": 0,
      "end_learning_rate_factor": 0.0,
      "weight_decay": 0.0,
      "no_decay": (r"(^|/)bias$", r"(^|/)scale$"),
      "momentum": 0.9,
      "nesterov": False,
      "b1": 0.9,
      "b2": 0.999,
      "eps": 1e-8,
      "grad_clip_norm": 0.0,
      # Discriminative learning rates (methods/discriminative.py).
      "lr_range": (),
      "lr_factor": 0.0,
      "lr_multipliers": (),
      # Slanted triangular (ULMFiT) and one-cycle schedule shapes.
      "cut_frac": 0.1,
      "ratio": 32.0,
      "pct_start": 0.25,
      "div_factor": 25.0,
      "final_div_factor": 1e4,
  })
  c.groups = ()
  c.freeze = ConfigDict({"patterns": (), "first_n": 0, "train_bn": False})
  c.features = ConfigDict({"cache": False, "max_memory_mb": 4096.0, "closed_form": (), "l2": 1e-4})
  c.unfreeze = ConfigDict({"mode": "none", "every_steps": 0, "every_epochs": 0.0, "initial_groups": 1,
                           "schedule": "continue"})
  # Parameter-efficient fine-tuning (finetune/adapters.py; one file per method in finetune/methods/).
  c.peft = ConfigDict({
      "method": "",  # '' (none), lora, bottleneck, prompt, prefix, bitfit, ia3
      "targets": (),  # layers to adapt: module names ('query', 'q_proj') or regexes over module paths
      "modules_to_save": (),  # regexes over parameter paths trained fully (e.g. '^head/')
      "bias": "none",  # none, all, lora_only
      # LoRA family (methods/lora.py)
      "rank": 8,
      "alpha": 8.0,
      "rslora": False,
      "dora": False,
      "dropout": 0.0,
      "init": "kaiming",  # kaiming, gaussian
      "rank_pattern": (),  # ((regex over module paths, rank), ...)
      "alpha_pattern": (),
      "lora_plus_ratio": 0.0,  # LoRA+: B's learning rate / A's (0: off; the paper uses 16)
      "quantize": "",  # '' or 'nf4' (QLoRA: frozen base kernels in 4-bit NormalFloat)
      "quant_block_size": 64,
      "double_quant": True,
      # Prompt and prefix tuning, bottleneck adapters
      "num_virtual_tokens": 20,
      "bottleneck_size": 64,
      # (IA)^3: targets whose input (not output) is scaled, as PEFT's feedforward_modules
      "feedforward": (),
      # An adapter to load onto the base: an adapter folder written by a PEFT stage or a PEFT (PyTorch) folder.
      "load_adapter": "",
  })
  # Forgetting regularizers (finetune/regularizers/, one file each), active when their weight is > 0.
  c.regularize = ConfigDict({
      "ewc": ConfigDict({"weight": 0.0, "label_mode": "empirical", "num_examples": 1000, "batch_size": 50,
                         "online": False, "gamma": 1.0}),
      "l2sp": ConfigDict({"alpha": 0.0, "beta": 0.0, "fisher": False}),
      "lwf": ConfigDict({"weight": 0.0, "temperature": 2.0}),
  })
  # Rehearsal: this fraction of every training batch is source-task examples, scored by the source head.
  c.rehearsal = ConfigDict({"fraction": 0.0, "weight": 1.0})
  c.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1})
  c.sharding_rules = ()
  c.activation_rules = ()  # ((activation logical name, mesh axis or axes or None), ...): see sharding.py
  c.init_from = ""
  c.dont_load = ()
  c.wandb = ConfigDict({"mode": "disabled", "project": "finetune", "entity": "", "name": "", "tags": ()})
  c.stages = ConfigDict()
  return c


# ----------------------------------------------------------------------------------------------- :arg parsing


_PATH_LIKE = ("path", "checkpoint", "file", "dir")


def parse_arg(arg: str | None, **spec: Any) -> ConfigDict:
  """Parses a config file's `:key=value,key2=value2` argument against `spec` (the keys and their defaults).

  Values take the type of their default. An unknown key is an error, so `:arg` never passes unnoticed.
  A bare word `:foo`, as the first item only, sets `variant` or else the first key whose default is a string and
  that names no path. Commas inside brackets or quotes belong to the value: `:sizes=(100,500),variant=ewc` is two
  arguments.
  """
  result = ConfigDict(dict(spec))
  if isinstance(arg, ConfigArg):
    arg.parsed = True
  if not arg:
    return result
  given, previous = set(), ""
  for item in split_config_arg(arg):
    key, sep, text = item.partition("=")
    key = key.strip()
    if not item.strip():  # (read as a bare word, it set the first string setting to '')
      raise FinetuneError(f"config argument {str(arg)!r} has an empty item (a stray comma); remove it")
    if not sep and key in spec:  # (read as a bare word: `:steps` set the first string setting, a path, to 'steps')
      raise FinetuneError(f"config argument {key!r} has no value; write {key}=VALUE")
    if not sep:
      # A bare word names a choice (`:ewc` for `:variant=ewc`): only first, never a number or a path. (`:steps=30,10`
      # set data_path to '10' and failed on a missing folder; `:ns=1,3` said ns was given twice.)
      string_keys = [k for k, v in spec.items() if isinstance(v, str) and not k.endswith(_PATH_LIKE)]
      if given or not string_keys or not isinstance(parse_literal(item), str):
        after = f" after {previous.strip()!r}" if given else ""
        raise FinetuneError(f"config argument {item.strip()!r}{after} is not key=value: name its key, and write a "
                            f"list in brackets (key=(a,b)); valid keys: {', '.join(spec) or '(none)'}")
      key, text = ("variant" if "variant" in string_keys else string_keys[0]), item
    if key not in spec:
      raise FinetuneError(f"unknown config argument {key!r}{_did_you_mean(key, spec)}; "
                          f"valid arguments: {', '.join(spec) or '(none)'}")
    if key in given:  # (the last one won silently)
      raise FinetuneError(f"config argument {key!r} is given twice in {str(arg)!r}; give it once")
    given.add(key)
    previous = item
    result[key] = coerce(parse_literal(text), spec[key], f":{key}")
  return result


def refuse_unread(arg: str | None, keys: Sequence[str], why: str) -> None:
  """For a config file: refuses the `:key=value` items of `arg` whose key is in `keys`, the arguments that `why`
  (the chosen variant, say) leaves unread. (They were accepted and ignored: `:variant=full,n=3` trained no
  frozen groups.)"""
  given = arg_keys(arg)
  unread = [key for key in keys if key in given]
  if unread:
    raise FinetuneError(f"config argument{'s' if len(unread) > 1 else ''} {', '.join(unread)} "
                        f"{'are' if len(unread) > 1 else 'is'} not read with {why}: drop "
                        f"{'them' if len(unread) > 1 else 'it'}")


def arg_keys(arg: str | None) -> set[str]:
  """The keys of a `:arg` text's `key=value` items."""
  return {item.partition("=")[0].strip() for item in split_config_arg(str(arg or "")) if "=" in item}


def split_config_arg(text: str) -> list[str]:
  """The items of a `:arg` text: `text` split at the commas outside brackets and quotes. (Hand-written: neither
  ml_collections' config_flags nor ast parse `key=value,key=value`; a plain split would cut `sizes=(100,500)`.)"""
  items, depth, quote, start = [], 0, "", 0
  for index, char in enumerate(text):
    if quote:
      quote = "" if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      items.append(text[start:index])
      start = index + 1
  if depth or quote:
    raise FinetuneError(f"config argument {text!r} has an unclosed {'quote' if quote else 'bracket'}; close it")
  return [*items, text[start:]]


# ---------------------------------------------------------------------------------------------------- loading


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """Loads `path/to/file.py[:arg]`, applies `key.sub=value` overrides, validates, and returns it locked."""
  path, _, arg = spec.partition(":")
  module = import_config_file(path)
  if not hasattr(module, "get_config"):
    raise FinetuneError(f"config file {path} has no get_config(arg=None) function; define one")
  takes_arg = bool(inspect.signature(module.get_config).parameters)
  if arg and not takes_arg:
    raise FinetuneError(f"config file {path} takes no argument but got ':{arg}'; drop ':{arg}'")
  config_arg = ConfigArg(arg) if arg else None
  try:
    raw = module.get_config(config_arg) if takes_arg else module.get_config()
  except FinetuneError:
    raise
  except Exception as e:  # A bug in the config file: one line naming it (its traceback is chained for debugging).
    raise FinetuneError(f"config file {path}: get_config raised {type(e).__name__}: {e}{raised_at(e)}") from e
  if not isinstance(raw, (dict, ConfigDict)):
    raise FinetuneError(f"config file {path}: get_config returned {type(raw).__name__}; return an "
                        "ml_collections.ConfigDict (or a dict)")
  if config_arg is not None and not config_arg.parsed:
    raise FinetuneError(f"config file {path} ignored its argument ':{arg}'; drop it, or read it in get_config "
                        "with finetune.config.parse_arg(arg, key=default, ...)")
  return build_config(raw, overrides)


class ConfigArg(str):
  """The `:arg` text, remembering whether `parse_arg` read it (an unread argument is an error, never ignored) and,
  for get_sweep, which of its keys are the sweep's alone (`finetune.sweep.parse_sweep_arg`)."""

  parsed = False
  sweep_only: frozenset[str] = frozenset()


def import_config_file(path: str):
  """The experiment file as a module (its get_config, and get_sweep where it defines one)."""
  if not os.path.isfile(path):
    raise FinetuneError(f"config file {path!r} does not exist; pass --config configs/<file>.py")
  if not path.endswith(".py"):
    raise FinetuneError(f"config file {path!r} is not a Python file; pass --config configs/<file>.py")
  module_spec = importlib.util.spec_from_file_location(f"finetune_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except FinetuneError:
    raise
  except Exception as e:  # A broken config file: show where, in one line.
    raise FinetuneError(f"config file {path} failed to import: {type(e).__name__}: {e}{raised_at(e)}") from e
  return module


def build_config(raw: ConfigDict | dict, overrides: Sequence[str] = ()) -> ConfigDict:
  """Merges `raw` over `defaults()`, applies overrides, validates, locks. Notebooks and tests use this."""
  config = defaults()
  _merge(config, raw, prefix="")
  for override in overrides:
    apply_override(config, override)
  _check_overrides_reach_a_stage(config, overrides)
  validate(config)
  config.lock()
  return config


def _check_overrides_reach_a_stage(config: ConfigDict, overrides: Sequence[str]) -> None:
  """A base-config override that a stage sets for itself does not reach that stage (the stage's keys win): an
  error when no stage takes it (it would change nothing but config.json), a warning naming the stages that ignore
  it otherwise."""
  names = ordered_keys(config.stages)
  for override in overrides:
    dotted = override.partition("=")[0]
    if not names or dotted == "stages" or dotted.startswith("stages."):
      continue
    shadowing = [name for name in names if _sets(config.stages[name], dotted.split("."))]
    if not shadowing:
      continue
    fix = f"--config.stages.{shadowing[0]}.{dotted}=VALUE"
    if len(shadowing) == len(names):
      raise FinetuneError(f"--config.{dotted} reaches no stage: every stage sets its own ({', '.join(names)}); "
                          f"override it per stage, e.g. {fix}")
    print(f"finetune: --config.{dotted} does not reach stage{'s' if len(shadowing) > 1 else ''} "
          f"{', '.join(shadowing)}, which {'set their' if len(shadowing) > 1 else 'sets its'} own ({fix} to change it)",
          file=sys.stderr)


def _sets(section: Any, keys: list[str]) -> bool:
  """Whether a stage's section sets the dotted key `keys` (stages merge section by section, so only the key itself
  set in the stage shadows the base config's)."""
  for key in keys:
    if not isinstance(section, (dict, ConfigDict)) or key not in section:
      return False
    section = section[key]
  return True


def apply_override(config: ConfigDict, override: str) -> None:
  """Applies one `a.b.c=value` override (the text after `--config.`) with the same checks as a config file."""
  dotted, sep, text = override.partition("=")
  if not sep:
    raise FinetuneError(f"override --config.{override} has no value; write --config.{dotted}=VALUE")
  *parents, leaf = dotted.split(".")
  if not parents and leaf == "stages":
    raise FinetuneError("override --config.stages would replace the config's stages; change one stage's key with "
                        "--config.stages.<stage>.<key>=VALUE (stages: "
                        f"{', '.join(ordered_keys(config.stages)) or '(none)'})")
  if len(parents) >= 2 and parents[0] == "stages" and parents[1] not in config.stages:
    # An override may change a stage the config declares, never create one: a typo would silently add a stage.
    raise FinetuneError(f"override --config.{dotted} names stage {parents[1]!r}, which the config does not declare"
                        f"{_did_you_mean(parents[1], ordered_keys(config.stages))}; stages: "
                        f"{', '.join(ordered_keys(config.stages)) or '(none)'}")
  node, walked = config, []
  for key in parents:
    walked.append(key)
    if key not in node:
      if _is_open(".".join(walked[:-1])) or _under_stages(walked[:-1]):
        node[key] = ConfigDict()
      else:
        raise FinetuneError(_unknown_key_message(".".join(walked), node))
    node = node[key]
    if not isinstance(node, ConfigDict):
      raise FinetuneError(f"config key {'.'.join(walked)!r} is a value, not a section; cannot set {dotted!r}")
  if parents and parents[0] == "stages":
    if len(parents) < 2:
      raise FinetuneError(f"override --config.{dotted} must name a stage key: --config.stages.<stage>.<key>=VALUE")
    _merge_stage(node, {leaf: parse_literal(text)}, dotted)
  else:
    _merge(node, {leaf: parse_literal(text)}, prefix=".".join(parents))


def stage_configs(config: ConfigDict) -> list[tuple[str, ConfigDict]]:
  """The ordered stages as (name, full config for that stage). A config without stages is one stage 'train'.

  Stage order is the order in which the config file created them (ConfigDict keeps insertion order).
  """
  base = ConfigDict(config.to_dict())  # An unlocked deep copy.
  names = ordered_keys(config.stages)
  del base["stages"]
  if not names:
    return [("train", _frozen(_with_seed_offset(base)))]
  result = []
  for index, name in enumerate(names):
    stage = ConfigDict(base.to_dict())
    stage_data = config.stages[name].get("data", {})
    if stage_data.get("name", stage.data.name) != stage.data.name:
      # Options are the source's arguments: a stage reading another source starts from none, not the base's.
      stage.data.options = ConfigDict()
    try:
      _merge(stage, config.stages[name], prefix="")
    except FinetuneError as e:
      raise FinetuneError(f"in config.stages.{name}: {e}") from None
    _with_seed_offset(stage)
    init_from = stage.init_from
    if init_from.startswith("stage:"):
      source = init_from[len("stage:"):]
      if source not in names[:index]:
        raise FinetuneError(f"stage {name!r} has init_from={init_from!r} but {source!r} is not an earlier stage; "
                            f"earlier stages: {', '.join(names[:index]) or '(none)'}")
    result.append((name, _frozen(stage)))
  return result


def _with_seed_offset(stage: ConfigDict) -> ConfigDict:
  if not isinstance(stage.seed_offset, int) or stage.seed_offset < 0:
    raise FinetuneError(f"config.seed_offset must be an int >= 0, got {stage.seed_offset!r}")
  stage.seed, stage.seed_offset = stage.seed + stage.seed_offset, 0
  return stage


def ordered_keys(section: ConfigDict | dict | None) -> list[str]:
  """Keys in insertion order. (`ConfigDict.keys()` sorts them; only its JSON form keeps the order written.)"""
  if section is None:
    return []
  if isinstance(section, dict):
    return list(section)
  return list(json.loads(section.to_json_best_effort()).keys())


def validate(config: ConfigDict) -> None:
  """Checks values (names exist, numbers in range) for the base config and every stage."""
  stages = stage_configs(config)
  for name, stage in stages:
    where = "" if name == "train" and not len(config.stages) else f" (stage {name!r})"
    _validate_stage(stage, where)
  # Validation is the first `fraction` of one fixed permutation of the training rows: a stage carving a larger
  # fraction of the data its source trained on would validate on rows the source trained on.
  by_name = dict(stages)
  for name, stage in stages:
    if not stage.init_from.startswith("stage:"):
      continue
    source = by_name[stage.init_from[len("stage:"):]]
    same_data = all(_as_json(stage.data[key]) == _as_json(source.data[key]) for key in ("name", "path", "options"))
    if same_data and stage.data.validation_fraction != source.data.validation_fraction:
      raise FinetuneError(f"stage {name!r} carves config.data.validation_fraction={stage.data.validation_fraction} "
                          f"of the data its source {stage.init_from!r} carved {source.data.validation_fraction} "
                          "from, so its validation split would hold rows the source trained on; give both the same "
                          "fraction")
    if same_data and stage.data.validation_fraction and stage.data.stratify != source.data.stratify:
      raise FinetuneError(f"stage {name!r} carves its validation split with config.data.stratify="
                          f"{stage.data.stratify} from the data its source {stage.init_from!r} carved with "
                          f"{source.data.stratify}, so it would validate on rows the source trained on; give both "
                          "the same setting")
  _refuse_settings_no_stage_reads(config, stages)
  _refuse_conditional_settings_no_stage_reads(config, stages)
  # PEFT settings with no method in any stage add no adapter: a LoRA setting alone would train the full model.
  # (A stage that sets method='' under a base config's LoRA settings turns PEFT off on purpose.)
  if not any(stage.peft.method for _, stage in stages):
    from finetune.adapters import PEFT_METHODS  # pylint: disable=g-import-not-at-top
    default = defaults().peft
    for name, stage in stages:
      changed = [key for key in stage.peft.keys() if _as_json(stage.peft[key]) != _as_json(default[key])]
      if changed:
        where = "" if name == "train" and not len(config.stages) else f" (stage {name!r})"
        raise FinetuneError(f"{', '.join('config.peft.' + key for key in changed)} "
                            f"{'is' if len(changed) == 1 else 'are'} set but config.peft.method is empty, so no "
                            "adapter would be added and the whole model would train: set config.peft.method "
                            f"({', '.join(PEFT_METHODS.names())}) or drop the setting{where}")


def _optional_settings(choices: Iterable[Any]) -> list[tuple[str, str, str, tuple[str, ...]]]:
  """(section, key, choosing key, the choices that read it) for the settings only some choices read: a schedule's
  or optimizer's own keys (when every stage's `choices` (resolved configs or dicts) uses built-in ones: another
  registered elsewhere may read any key) and the unfreezing keys, read by modes other than 'none'."""
  from finetune.optim import BUILT_IN, SETTING_READERS  # pylint: disable=g-import-not-at-top
  choices = list(choices)
  settings = [("optimizer", key, chooser, readers) for chooser, keys in SETTING_READERS.items()
              for key, readers in keys.items()
              if all(choice["optimizer"][chooser] in BUILT_IN[chooser] for choice in choices)]
  return settings + [("unfreeze", key, "mode", ("gradual", "chain_thaw")) for key in defaults().unfreeze
                     if key != "mode"]


def _unread_settings_blame(config: ConfigDict, stages: list[tuple[str, ConfigDict]], dotted: str,
                           reads: Callable[[ConfigDict], bool]) -> tuple[list[str], bool] | None:
  """The rule of both refusals below for the setting `dotted` ('optimizer.cut_frac'), which a stage reads when
  `reads(stage)`: a stage's own setting (in its config.stages entry) must be read by that stage, a base config's
  by some stage (it may be meant for only some of them). (the stages to name, whether they set it themselves), or
  None when every changed value is read."""
  def value(c: Any) -> Any:
    for part in dotted.split("."):
      c = c[part]
    return c

  def set_in(overrides: Any) -> bool:
    for part in dotted.split("."):
      if not isinstance(overrides, (dict, ConfigDict)) or part not in overrides:
        return False
      overrides = overrides[part]
    return True

  default, staged = value(defaults()), len(config.stages) > 0
  changed = [(name, stage) for name, stage in stages if _as_json(value(stage)) != _as_json(default)]
  unread_own = [name for name, stage in changed if staged and set_in(config.stages[name]) and not reads(stage)]
  if unread_own:
    return unread_own, True
  if changed and not any(reads(stage) for _, stage in stages):
    return [name for name, _ in changed], False
  return None


def _where(config: ConfigDict, names: list[str]) -> str:
  return f" (stage{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))})" if len(config.stages) else ""


def _refuse_settings_no_stage_reads(config: ConfigDict, stages: list[tuple[str, ConfigDict]]) -> None:
  """A schedule's or optimizer's own setting (optimizer.cut_frac, momentum, ...) or an unfreezing setting changed
  from its default where it is not read: it would be ignored (cut_frac with cosine, momentum with adamw,
  unfreeze.every_steps with mode 'none')."""
  by_name = dict(stages)
  for section, key, chooser, readers in _optional_settings(stage for _, stage in stages):
    blame = _unread_settings_blame(config, stages, f"{section}.{key}",
                                   lambda stage, section=section, chooser=chooser, readers=readers:
                                   stage[section][chooser] in readers)
    if blame:
      names, own = blame
      value, chosen = by_name[names[0]][section][key], sorted({by_name[name][section][chooser] for name in names})
      raise FinetuneError(f"config.{section}.{key}={value!r} is read only with config.{section}.{chooser} "
                          f"{' or '.join(map(repr, readers))}, which {'it' if own else 'no stage'} uses "
                          f"({', '.join(map(repr, chosen))}): it would be ignored; drop it or set "
                          f"config.{section}.{chooser}{_where(config, names)}")


def _uses_fisher(c: ConfigDict) -> bool:
  return c.regularize.ewc.weight > 0 or (c.regularize.l2sp.alpha > 0 and c.regularize.l2sp.fisher)


# Settings read only when another setting turns their part on: (setting, what turns it on, whether a stage does).
_CONDITIONAL_SETTINGS: tuple[tuple[str, str, Callable[[ConfigDict], bool]], ...] = (
    ("regularize.ewc.online", "regularize.ewc.weight > 0", lambda c: c.regularize.ewc.weight > 0),
    ("regularize.ewc.gamma", "regularize.ewc.weight > 0 and online=True",
     lambda c: c.regularize.ewc.weight > 0 and c.regularize.ewc.online),
    *((f"regularize.ewc.{key}", "regularize.ewc.weight > 0, or l2sp.alpha > 0 with fisher=True", _uses_fisher)
      for key in ("label_mode", "num_examples", "batch_size")),
    ("regularize.l2sp.fisher", "regularize.l2sp.alpha > 0", lambda c: c.regularize.l2sp.alpha > 0),
    ("regularize.lwf.temperature", "regularize.lwf.weight > 0", lambda c: c.regularize.lwf.weight > 0),
    ("rehearsal.weight", "rehearsal.fraction > 0", lambda c: c.rehearsal.fraction > 0),
)


def _refuse_conditional_settings_no_stage_reads(config: ConfigDict, stages: list[tuple[str, ConfigDict]]) -> None:
  """A regularizer's setting changed where its regularizer is off (ewc.gamma without online, lwf.temperature
  without lwf, rehearsal.weight without a fraction, l2sp.fisher without alpha): ignored, so refused."""
  by_name = dict(stages)
  for setting, turned_on_by, reads in _CONDITIONAL_SETTINGS:
    blame = _unread_settings_blame(config, stages, setting, reads)
    if blame:
      names, own = blame
      value = by_name[names[0]]
      for part in setting.split("."):
        value = value[part]
      raise FinetuneError(f"config.{setting}={value!r}{_where(config, names)} is read only with "
                          f"config.{turned_on_by}, which {'it does not set' if own else 'no stage sets'}: "
                          "it would be ignored; drop it or turn that on")


def without_unread_settings(raw: dict[str, Any]) -> dict[str, Any]:
  """One stage's saved config (its config.json, a dict) with the settings its own schedule, optimizer and
  unfreezing mode do not read reset to their defaults: every stage's file keeps the base config's settings, also
  those meant for other stages, which `build_config` on the file alone would refuse (finetune eval did)."""
  default = defaults()
  raw = json.loads(json.dumps(raw))
  filled = {section: {**default[section].to_dict(), **raw.get(section, {})} for section in ("optimizer", "unfreeze")}
  for section, key, chooser, readers in _optional_settings([filled]):
    if filled[section][chooser] not in readers and key in raw.get(section, {}):
      raw[section][key] = default[section][key]
  return raw


def with_values(config: ConfigDict, **sections: Any) -> ConfigDict:
  """An unlocked copy of a resolved config with whole sections replaced (e.g. another stage's `data` to evaluate
  this stage's weights on that stage's task)."""
  copy = ConfigDict(json.loads(to_json(config)))
  for key, value in sections.items():
    copy[key] = ConfigDict(json.loads(to_json(value))) if isinstance(value, ConfigDict) else value
  return copy


def to_json(config: ConfigDict) -> str:
  return config.to_json(indent=2)


# ------------------------------------------------------------------------------------------------- internals


def _validate_stage(c: ConfigDict, where: str) -> None:
  # Imported here: the registries pull in jax/flax, which `parse_arg` users in config files do not need.
  from finetune.data import SOURCES  # pylint: disable=g-import-not-at-top
  from finetune.data.pipeline import check_options  # pylint: disable=g-import-not-at-top
  from finetune.methods.discriminative import check_settings as check_lr_settings  # pylint: disable=g-import-not-at-top
  from finetune.models import MODELS, check_arguments  # pylint: disable=g-import-not-at-top
  from finetune.optim import OPTIMIZERS, SCHEDULES  # pylint: disable=g-import-not-at-top

  from finetune.tasks import TASKS, evaluation_keys  # pylint: disable=g-import-not-at-top

  TASKS.get(c.task)
  MODELS.get(c.model.name)
  SOURCES.get(c.data.name)
  try:
    check_arguments(c.model.name, [key for key in c.model if key != "name"])
    check_options(c.data)
    check_lr_settings(c.optimizer)
  except FinetuneError as e:
    raise FinetuneError(f"{e}{where}") from None
  OPTIMIZERS.get(c.optimizer.name)
  SCHEDULES.get(c.optimizer.schedule)

  def need(ok: bool, message: str):
    if not ok:
      raise FinetuneError(message + where)

  need(c.train.steps >= 0 and c.train.epochs >= 0 and (c.train.steps > 0 or c.train.epochs > 0),
       "set config.train.steps or config.train.epochs to a positive number")
  # (JAX's PRNGKey keeps a seed's low 32 bits and numpy's SeedSequence splits it into 32-bit words: a larger
  # seed would be another seed's stream.)
  need(0 <= c.seed < 2 ** 32, f"config.seed must be >= 0 and < 2**32 (got {c.seed})")
  need(c.train.eval_every >= 0, "config.train.eval_every must be >= 0 (0: evaluate at the end only)")
  need(c.data.augment.crop_padding >= 0, "config.data.augment.crop_padding must be >= 0")
  need(c.unfreeze.every_steps >= 0 and c.unfreeze.every_epochs >= 0,
       "config.unfreeze.every_steps and every_epochs must be >= 0")
  # (checked when the stage opened: after the earlier stages had trained; the mode first, as a typo'd one was
  # told it needed every_steps)
  need(c.unfreeze.mode in ("none", "gradual", "chain_thaw"),
       f"config.unfreeze.mode={c.unfreeze.mode!r}; valid: none, gradual, chain_thaw")
  need(c.unfreeze.mode == "none" or bool(c.unfreeze.every_steps) != bool(c.unfreeze.every_epochs),
       f"config.unfreeze.mode={c.unfreeze.mode!r} needs exactly one of config.unfreeze.every_steps and every_epochs "
       f"(got {c.unfreeze.every_steps} and {c.unfreeze.every_epochs})")
  need(0 < c.optimizer.cut_frac < 1 and c.optimizer.ratio > 0,
       "config.optimizer.cut_frac must be in (0, 1) and ratio > 0 (ULMFiT: 0.1 and 32)")
  need(0 < c.optimizer.pct_start < 1 and c.optimizer.div_factor > 0 and c.optimizer.final_div_factor > 0,
       "config.optimizer.pct_start must be in (0, 1), div_factor and final_div_factor > 0")
  # (a negative end factor made the learning rate negative, gradient ascent; a negative warm-up or clip norm was
  # taken silently)
  need(c.optimizer.warmup_steps >= 0 and c.optimizer.end_learning_rate_factor >= 0
       and c.optimizer.grad_clip_norm >= 0,
       "config.optimizer.warmup_steps, end_learning_rate_factor and grad_clip_norm must be >= 0 (0: none)")
  # (b2=1 froze Adam's second moment and the NaN that followed blamed the learning rate; b2>1 trained silently)
  need(0 <= c.optimizer.b1 < 1 and 0 <= c.optimizer.b2 < 1 and c.optimizer.eps > 0,
       f"config.optimizer.b1={c.optimizer.b1} and b2={c.optimizer.b2} must be in [0, 1) and eps={c.optimizer.eps} "
       "> 0 (Adam's defaults: 0.9, 0.999, 1e-8)")
  # (an empty tuple was told to raise validation_fraction; 'train' that the source has no train split)
  need(len(c.data.eval_splits) > 0, "config.data.eval_splits is empty: name at least one split to evaluate, e.g. "
       "('validation',)")
  need("train" not in c.data.eval_splits, "config.data.eval_splits names 'train': the training split is not "
       "evaluated (metrics.jsonl logs its running loss and accuracy); carve a 'validation' split "
       "(config.data.validation_fraction) or evaluate 'test'")
  need(0 <= c.optimizer.momentum < 1, f"config.optimizer.momentum={c.optimizer.momentum} must be in [0, 1) (0: none)")
  need(c.features.l2 >= 0 and c.features.max_memory_mb >= 0,
       "config.features.l2 (the closed-form probes' ridge) and max_memory_mb must be >= 0")
  for group in c.groups:
    need(isinstance(group, (tuple, list)) and len(group) == 2 and all(isinstance(g, str) for g in group),
         f"config.groups entry {group!r} must be (group name, regex over parameter paths)")
    try:
      re.compile(group[1])
    except re.error as e:
      need(False, f"config.groups: {group[1]!r} is not a valid regex ({e})")
  need(not (c.optimizer.schedule in ("stlr", "onecycle") and c.optimizer.warmup_steps),
       f"schedule {c.optimizer.schedule!r} has its own warm-up: set config.optimizer.warmup_steps=0")
  need(not (c.dont_load and not c.init_from), "config.dont_load has no effect without config.init_from; set both")
  for key in ("no_decay", "dont_load"):
    patterns = c.optimizer.no_decay if key == "no_decay" else c.dont_load
    for pattern in patterns:
      try:
        re.compile(pattern)
      except re.error as e:
        need(False, f"config.{'optimizer.' if key == 'no_decay' else ''}{key}: {pattern!r} is not a valid regex ({e})")
  for rule in c.optimizer.lr_multipliers:  # (a multiplier of 0 trained them, with optimizer state, never moving)
    need(isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
         and isinstance(rule[1], (int, float)) and rule[1] > 0,
         f"config.optimizer.lr_multipliers entry {rule!r} must be (regex, multiplier > 0); to keep parameters "
         "fixed, freeze them (config.freeze.patterns)")
    try:
      re.compile(rule[0])
    except re.error as e:
      need(False, f"config.optimizer.lr_multipliers: {rule[0]!r} is not a valid regex ({e})")
  need(not (c.train.steps > 0 and c.train.epochs > 0),
       "set only one of config.train.steps and config.train.epochs")
  need(c.data.batch_size > 0 and c.data.eval_batch_size > 0, "config.data.batch_size and eval_batch_size must be > 0")
  need(c.train.remat in ("", "block", "dots"), f"config.train.remat={c.train.remat!r}; valid: '' (off), block, dots")
  need(c.train.compute_dtype in ("float32", "bfloat16"),
       f"config.train.compute_dtype={c.train.compute_dtype!r}; valid: float32, bfloat16")
  need(c.train.grad_accum_steps >= 1 and c.data.batch_size % c.train.grad_accum_steps == 0,
       f"config.train.grad_accum_steps={c.train.grad_accum_steps} must be >= 1 and divide config.data.batch_size="
       f"{c.data.batch_size}")
  need(0.0 <= c.data.validation_fraction < 1.0, "config.data.validation_fraction must be in [0, 1)")
  need(not c.data.stratify or c.data.validation_fraction > 0,
       "config.data.stratify carves the validation split class by class, and config.data.validation_fraction is 0 "
       "(nothing is carved): set a fraction or drop stratify")
  need(c.optimizer.learning_rate >= 0, "config.optimizer.learning_rate must be >= 0")
  need(c.optimizer.weight_decay >= 0, "config.optimizer.weight_decay must be >= 0 (0: off)")
  need(0.0 <= c.train.label_smoothing < 1.0, "config.train.label_smoothing must be in [0, 1)")
  need(c.train.log_every > 0, "config.train.log_every must be > 0")
  need(c.train.checkpoint_every >= 0 and c.train.keep_checkpoints >= 1,
       "config.train.checkpoint_every must be >= 0 and config.train.keep_checkpoints >= 1")
  need(c.wandb.mode in ("disabled", "offline", "online"), "config.wandb.mode must be disabled, offline or online")
  need(all(isinstance(tag, str) for tag in c.wandb.tags), f"config.wandb.tags must be strings (got "
       f"{tuple(c.wandb.tags)!r}): quote them, e.g. --config.wandb.tags=\"('lora', 'r8')\"")
  # `--config.wandb.tags="(lora, r8)"` does not parse as a tuple (its items are unquoted names), so ml_collections
  # keeps the whole text as one tag: refused rather than logged as the tag "(lora, r8)". (A lone bracketed tag
  # without a comma, such as "(wip)", stays a tag.)
  if len(c.wandb.tags) == 1:  # (every tag is a string, checked above)
    tag, = c.wandb.tags
    need(not re.fullmatch(r"\s*[(\[].*,.*[)\]]\s*", tag, re.S),
         f"config.wandb.tags is the one tag {tag!r}, which looks like a tuple whose items are not quoted: write "
         "--config.wandb.tags=\"('lora', 'r8')\"")
  need(len(set(c.data.classes)) == len(c.data.classes), "config.data.classes has repeated classes")
  for probe in c.features.closed_form:
    need(probe in ("ridge", "logistic"),
         f"unknown closed-form probe {probe!r} in config.features.closed_form; valid: ridge, logistic")
  need(c.unfreeze.schedule in ("continue", "restart", "cycle"),
       f"config.unfreeze.schedule={c.unfreeze.schedule!r}; valid: continue, restart, cycle")
  from finetune.adapters import BIAS_MODES, PEFT_METHODS  # pylint: disable=g-import-not-at-top
  if c.peft.method:
    PEFT_METHODS.get(c.peft.method)
  need(c.peft.bias in BIAS_MODES, f"config.peft.bias={c.peft.bias!r}; valid: {', '.join(BIAS_MODES)}")
  need(c.peft.rank >= 1, f"config.peft.rank={c.peft.rank} must be an integer >= 1")
  need(c.peft.alpha > 0, f"config.peft.alpha={c.peft.alpha} must be > 0")
  need(0.0 <= c.peft.dropout < 1.0, "config.peft.dropout must be in [0, 1)")
  need(c.peft.lora_plus_ratio >= 0, "config.peft.lora_plus_ratio must be >= 0 (0: off)")
  need(c.peft.num_virtual_tokens >= 1 and c.peft.bottleneck_size >= 1,
       "config.peft.num_virtual_tokens and bottleneck_size must be >= 1")
  if c.peft.method:  # a setting of another method would be ignored silently (e.g. quantize='nf4' under ia3)
    own, default = PEFT_METHODS.get(c.peft.method).settings, defaults().peft
    for name in PEFT_METHODS.names():
      for key in (k for k in PEFT_METHODS.get(name).settings if k not in own):
        need(_as_json(c.peft[key]) == _as_json(default[key]),
             f"config.peft.{key} is a setting of method {name!r}; method={c.peft.method!r} would ignore it: drop it "
             "(or choose that method)")
  if c.peft.method:
    method = PEFT_METHODS.get(c.peft.method)
    need(method.targets != "required" or bool(c.peft.targets),
         f"config.peft.targets is empty; method={c.peft.method!r} adapts the layers it names: set it (e.g. "
         "('query', 'value'))")
    need(method.targets != "ignored" or not c.peft.targets,
         f"config.peft.targets={tuple(c.peft.targets)!r}, but method={c.peft.method!r} chooses what it adapts "
         "itself and would ignore it: drop it (a stage that switches method inherits the base config's targets: set "
         "targets=() in it)")
    need(method.targets == "required" or c.peft.bias != "lora_only",
         f"config.peft.bias='lora_only' trains the biases of adapted layers, and method={c.peft.method!r} adapts "
         "none: use 'all' or 'none' (in this stage, if it inherits the base config's)")
    need(not c.freeze.train_bn, f"config.freeze.train_bn=True has no effect under config.peft.method="
         f"{c.peft.method!r}, which trains only what it adds and what config.peft.modules_to_save names: name the "
         "BatchNorm parameters there instead (the CNN's: '/norm/'), and set train_bn=False (in this stage, if it "
         "inherits the base config's)")
    try:
      method.check_config(c.peft)
    except FinetuneError as e:
      raise FinetuneError(f"{e}{where}") from None
  need(not (c.peft.load_adapter and not c.peft.method),
       "config.peft.load_adapter needs config.peft.method (and the adapter's targets and rank) set")
  need(not (c.peft.method == "prompt" and c.data.options.get("pack", False)),
       "config.peft.method='prompt' prepends one prompt per row, but config.data.options.pack=True puts several "
       "conversations in a row and only the first would see it: set pack=False")
  need(not (c.peft.method and c.features.cache),
       "config.features.cache needs a frozen backbone; PEFT methods train inside it: drop one of them")
  # What feature_cache.check_cacheable refuses when the stage opens, refused here when the config alone decides it,
  # so a multi-stage run does not fail after its earlier stages trained. (Backbone dropout needs the model.)
  need(not (c.features.cache and (c.data.augment.crop_padding or c.data.augment.flip)),
       "config.features.cache computes each example's features once, so augmentation cannot apply: set "
       "config.data.augment.crop_padding=0 and flip=False")
  need(not (c.features.cache and c.freeze.train_bn),
       "config.features.cache computes features once, so BatchNorm cannot train: set config.freeze.train_bn=False")
  need(not (c.features.cache and c.unfreeze.mode != "none"),
       "config.features.cache needs the backbone frozen for the whole stage: set config.unfreeze.mode='none'")
  from finetune.regularizers.fisher import LABEL_MODES  # pylint: disable=g-import-not-at-top
  need(c.regularize.ewc.label_mode in LABEL_MODES,
       f"config.regularize.ewc.label_mode={c.regularize.ewc.label_mode!r}; valid: {', '.join(LABEL_MODES)}")
  need(c.regularize.ewc.weight >= 0 and c.regularize.lwf.weight >= 0 and c.regularize.l2sp.alpha >= 0 and
       c.regularize.l2sp.beta >= 0 and c.rehearsal.weight >= 0,
       "config.regularize weights (ewc.weight, l2sp.alpha/beta, lwf.weight) and config.rehearsal.weight must be >= 0")
  need(c.regularize.ewc.num_examples >= 1 and c.regularize.ewc.batch_size >= 1 and 0 < c.regularize.ewc.gamma <= 1,
       "config.regularize.ewc: num_examples and batch_size must be >= 1 and gamma in (0, 1]")
  need(c.regularize.lwf.temperature > 0, "config.regularize.lwf.temperature must be > 0 (the paper uses 2)")
  need(0.0 <= c.rehearsal.fraction < 1.0, "config.rehearsal.fraction must be in [0, 1)")
  # (weight 0 gave a fraction of every batch to source rows whose loss counted for nothing)
  need(not (c.rehearsal.fraction > 0 and c.rehearsal.weight == 0),
       "config.rehearsal.weight=0 with fraction > 0 replaces target rows by source rows whose loss counts for "
       "nothing; set rehearsal.fraction=0 to turn rehearsal off")
  uses_heads = c.regularize.lwf.weight > 0 or c.rehearsal.fraction > 0
  need(not (uses_heads and c.task != "classification"),
       "LwF and rehearsal score the source head: they need task='classification'")
  need(not (uses_heads and c.features.cache), "LwF and rehearsal need the backbone's features every step: "
       "drop config.features.cache")
  stopping = c.train.early_stopping
  need(stopping.mode in ("max", "min"), "config.train.early_stopping.mode must be 'max' or 'min'")
  # (A patience or mode without a metric was ignored: the run never stopped early.)
  need(stopping.metric or (stopping.patience == 0 and stopping.mode == "max"),
       "config.train.early_stopping sets patience or mode but no metric, so nothing would stop the run early: set "
       "config.train.early_stopping.metric='<split>/<key>' (e.g. 'validation/accuracy') or drop them")
  need(not stopping.metric or ("/" in stopping.metric and stopping.patience >= 1 and c.train.eval_every > 0),
       "config.train.early_stopping needs metric='<split>/<key>' (e.g. 'validation/accuracy'), patience >= 1 and "
       "config.train.eval_every > 0")
  if stopping.metric:  # (found at the first evaluation, after checkpoints whose config then refused the fix)
    split, _, key = stopping.metric.partition("/")
    keys = evaluation_keys(TASKS.get(c.task))
    need(split in c.data.eval_splits and key in keys,
         f"config.train.early_stopping.metric={stopping.metric!r} is not evaluated: splits "
         f"{', '.join(c.data.eval_splits) or '(none)'} (config.data.eval_splits), metrics {', '.join(keys)}")
    better = {"loss": "min", "perplexity": "min", "accuracy": "max", "macro_f1": "max",
              "balanced_accuracy": "max"}.get(key, stopping.mode)
    # (mode='max' on a loss kept the worst checkpoint, silently)
    need(stopping.mode == better, f"config.train.early_stopping.metric={stopping.metric!r} is better when "
         f"{'lower' if better == 'min' else 'higher'}, but mode={stopping.mode!r}: set "
         f"config.train.early_stopping.mode={better!r}")
  for key in ("rank_pattern", "alpha_pattern"):
    for rule in c.peft[key]:
      # (a rank of 2.7 was built as 2 and an alpha of True as 1.0, silently)
      number = (int,) if key == "rank_pattern" else (int, float)
      need(isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
           and isinstance(rule[1], number) and not isinstance(rule[1], bool) and rule[1] > 0,
           f"config.peft.{key} entry {rule!r} must be (regex over module paths, "
           f"{'an integer rank >= 1' if key == 'rank_pattern' else 'a number > 0'})")
      try:
        re.compile(rule[0])
      except re.error as e:
        need(False, f"config.peft.{key}: {rule[0]!r} is not a valid regex ({e})")
  for axis, size in c.mesh.items():
    need(size == -1 or size >= 1, f"config.mesh.{axis} must be -1 (all remaining devices) or >= 1")


def _as_json(value: Any) -> str:
  return json.dumps(value, sort_keys=True, default=list)  # (tuples and lists alike)


def _frozen(config: ConfigDict) -> ConfigDict:
  config.lock()
  return config


def _is_open(dotted: str) -> bool:
  return dotted in OPEN_SECTIONS


def _under_stages(walked: list[str]) -> bool:
  """Inside `stages.<name>...` new sub-sections may be created; their leaves are checked when stages expand."""
  return len(walked) >= 1 and walked[0] == "stages"


def _did_you_mean(key: str, options: Iterable[str]) -> str:
  close = difflib.get_close_matches(key, list(options), n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key_message(dotted: str, node: ConfigDict) -> str:
  parent, _, leaf = dotted.rpartition(".")
  close = difflib.get_close_matches(leaf, list(node.keys()), n=1)
  hint = f" (did you mean {(parent + '.' if parent else '') + close[0]!r}?)" if close else ""
  return (f"unknown config key {dotted!r}{hint}; "
          f"valid keys here: {', '.join(sorted(node.keys()))}")


def _merge(base: ConfigDict, update: ConfigDict | dict, prefix: str) -> None:
  """Copies `update` into `base`: keys must exist in `base` (except in open sections and stages), types must fit."""
  items = update.items() if isinstance(update, (dict, ConfigDict)) else []
  for key, value in items:
    dotted = f"{prefix}.{key}" if prefix else key
    if prefix == "" and key == "stages":
      if not isinstance(value, (dict, ConfigDict)):
        raise FinetuneError(f"config.stages must be a ConfigDict of stages (name -> overrides), got {value!r}")
      if "stages" not in base:  # (merging a stage's overrides into its copy of the base config)
        raise FinetuneError("a stage cannot hold stages of its own; declare every stage in config.stages")
      for stage_name in ordered_keys(value):
        stage = value[stage_name]
        if not isinstance(stage, (dict, ConfigDict)):
          raise FinetuneError(f"config.stages.{stage_name} must be a ConfigDict of overrides")
        if stage_name not in base.stages:
          base.stages[stage_name] = ConfigDict()
        _merge_stage(base.stages[stage_name], stage, f"stages.{stage_name}")
      continue
    if key not in base:
      if _is_open(prefix):
        base[key] = ConfigDict(value) if isinstance(value, dict) else value
        continue
      raise FinetuneError(_unknown_key_message(dotted, base))
    current = base[key]
    if isinstance(current, ConfigDict):
      if not isinstance(value, (dict, ConfigDict)):
        raise FinetuneError(f"config key {dotted!r} is a section; set its keys ({', '.join(sorted(current.keys()))})")
      _merge(current, value, dotted)
    else:
      base[key] = coerce(value, current, dotted)


def _merge_stage(target: ConfigDict, update: ConfigDict | dict, prefix: str) -> None:
  """Stage overrides are kept as written; `stage_configs` checks them against the base when expanding."""
  for key, value in update.items():
    if isinstance(value, (dict, ConfigDict)):
      if key not in target or not isinstance(target[key], ConfigDict):
        target[key] = ConfigDict()
      _merge_stage(target[key], value, f"{prefix}.{key}")
    else:
      if key in target:  # (replaced, not assigned: ConfigDict refused another type with a TypeError traceback)
        del target[key]
      target[key] = tuple(value) if isinstance(value, list) else value


def parse_literal(text: Any) -> Any:
  if not isinstance(text, str):
    return text
  lowered = text.strip().lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def coerce(value: Any, default: Any, dotted: str) -> Any:
  """Gives `value` the type of `default`, allowing only lossless widenings (int -> float, list -> tuple)."""
  def bad():
    return FinetuneError(f"config key {dotted!r} expects {type(default).__name__} (like {default!r}), "
                         f"got {value!r}")
  if default is None or isinstance(value, ConfigDict):
    return value
  if isinstance(default, bool):
    if not isinstance(value, bool):
      raise bad()
    return value
  if isinstance(default, int):
    if isinstance(value, bool) or not isinstance(value, int):
      raise bad()
    return value
  if isinstance(default, float):
    if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
      raise FinetuneError(f"config key {dotted!r} must be a finite number, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise bad()
    if not math.isfinite(value):  # (1e400 parses as inf) a non-finite setting only surfaces later as a NaN loss
      raise FinetuneError(f"config key {dotted!r} must be a finite number, got {value!r}")
    return float(value)
  if isinstance(default, str):
    if not isinstance(value, str):
      return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _raise(bad())
    return value
  if isinstance(default, (tuple, list)):
    if isinstance(value, (tuple, list)):
      return tuple(_freeze_lists(v) for v in value)
    if isinstance(value, (str, int, float)):
      return (value,)
    raise bad()
  return value


def _freeze_lists(value: Any) -> Any:
  return tuple(_freeze_lists(v) for v in value) if isinstance(value, list) else value


def _raise(error: Exception):
  raise error


__all__ = ["defaults", "parse_arg", "split_config_arg", "load_config", "build_config", "apply_override",
           "stage_configs", "validate", "to_json", "ml_collections"]
