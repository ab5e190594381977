"""Sweeps: a config file's `get_sweep(arg=None)` lists points, each run as its own `finetune train`.

    from finetune.sweep import product, seeds, zipped

    def get_sweep(arg=None):  # 2 learning rates x 3 seeds = 6 points
      return product({"optimizer.learning_rate": [1e-3, 3e-3]}, seeds(3))

A point is a dict of dotted config keys -> values, applied as `--config.<key>=<value>`; a key starting with ':' is
a config-file argument instead (`{":variant": "ewc"}` runs `configs/x.py:variant=ewc`), and the value NOT_READ
drops the command's argument of that name from the point (`{":lm_steps": NOT_READ}` for a variant that trains no
language model, whose get_config refuses `:lm_steps`). Every point is loaded and
validated before anything runs. `run_sweep` runs each in `<workdir>/<point name>` as a subprocess (so a crash or
leaked device memory stays inside one point), skipping points finished earlier; `aggregate` tabulates the stages'
`summary.json` into `results.csv` (a row per point) and `results.md` (mean ± sample std over seeds).
"""

from __future__ import annotations

import ast
import collections
import concurrent.futures
import csv
import dataclasses
import functools
import hashlib
import inspect
import io
import itertools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Iterable, Sequence

from ml_collections import ConfigDict

from finetune import config as config_lib
from finetune import files, interrupts
from finetune.errors import FinetuneError, raised_at

POINTS_FILE = "points.json"
LOG_FILE = "sweep.log"
_MAX_NAME = 80


class _NotRead:
  def __repr__(self) -> str:
    return "NOT_READ"


# A point's value for a `:key` its get_config does not read: the command's `:key=...` (meant for the other points)
# is left out of this point's `:arg` rather than refused there as an unread argument (config.refuse_unread).
NOT_READ = _NotRead()

# ------------------------------------------------------------------------------------------ building points


def product(*parts: list[dict] | dict[str, Sequence], **axes: Sequence) -> list[dict[str, Any]]:
  """Every combination of the parts, the first varying slowest. A part is a list of points (`seeds(3)`,
  `zipped(...)`) or a dict {key: [values]}, itself a grid over its keys; keyword arguments are one more dict."""
  points = [{}]
  for _, part in _parts(parts, axes):
    points = [_merged(a, b) for a in points for b in part]
  return points


def zipped(*parts: list[dict] | dict[str, Sequence], **axes: Sequence) -> list[dict[str, Any]]:
  """Parts taken in parallel: point i merges the i-th point of every part. A dict {key: [values]} is a part per
  key, so `zipped({"optimizer.learning_rate": [1e-3, 1e-2], "train.steps": [400, 100]})` is 2 points."""
  labelled = _parts(parts, axes)
  if len({len(part) for _, part in labelled}) > 1:
    lengths = ", ".join(f"{label} has {len(part)}" for label, part in labelled)
    raise FinetuneError(f"zipped(...) needs parts of equal length: {lengths}")
  return [functools.reduce(_merged, row, {}) for row in zip(*(part for _, part in labelled))] if labelled else [{}]


def seeds(n_or_values: int | Iterable[int] | None, key: str = "seed", default: int | None = None
          ) -> list[dict[str, Any]]:
  """`seeds(3)` = [{'seed': 0}, {'seed': 1}, {'seed': 2}]; `seeds([7, 8])` takes the given values. A sweep's
  `:seeds=` argument passes either: `:seeds=3`, or `:seeds=(1,2)` to add seeds 1 and 2 to a sweep whose seed 0
  ran elsewhere (the point names are the same as with `:seeds=3`, so the folders can be merged). An unset
  argument (None) takes `default` seeds: `seeds(args.seeds, default=1)`."""
  if n_or_values is None and default is not None:
    n_or_values = default
  if isinstance(n_or_values, int) and not isinstance(n_or_values, bool):
    if n_or_values < 1:
      raise FinetuneError(f"seeds: {n_or_values} seeds gives no points; pass a count >= 1 or the seed values")
    return [{key: value} for value in range(n_or_values)]
  values = list(n_or_values) if isinstance(n_or_values, (list, tuple, range)) else None
  if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values) or len(set(values)) < len(values):
    raise FinetuneError(f"seeds: expected a count (like 3) or distinct integer seeds (like (1,2)), got {n_or_values!r}")
  return [{key: value} for value in values]


def _parts(parts: tuple, axes: dict) -> list[tuple[str, list[dict]]]:
  """(label for messages, list of points) per part, a dict part giving one per key (its grid is their product)."""
  result = []
  for index, part in enumerate([*parts, axes] if axes else parts):
    if isinstance(part, dict):
      for key, values in part.items():
        if not isinstance(key, str) or not isinstance(values, (list, tuple, range)):
          raise FinetuneError(f"sweep axis {key!r} needs a list of values, got {values!r}")
        result.append((key, [{key: value} for value in values]))
    elif isinstance(part, (list, tuple)) and all(isinstance(point, dict) for point in part):
      result.append((f"part {index + 1}", list(part)))
    else:
      raise FinetuneError(f"a sweep part must be a list of points (dicts) or a dict {{key: [values]}}, got {part!r}")
  return result


def _merged(a: dict, b: dict) -> dict:
  twice = [key for key in b if key in a]
  if twice:
    raise FinetuneError(f"sweep key {twice[0]!r} is set twice in one point ({a[twice[0]]!r} and {b[twice[0]]!r}); "
                        "combine parts that name different keys")
  return {**a, **b}


# ------------------------------------------------------------------------------------------ loading a sweep


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep."""

  name: str  # its folder under the sweep's workdir
  values: dict[str, Any]  # as get_sweep gave them: dotted config keys, ':'-prefixed config-file arguments
  config_spec: str  # `file.py[:arg]` with this point's arguments merged in
  overrides: tuple[str, ...]  # `key=value` texts (what follows --config.): the command line's, then the point's
  config: ConfigDict  # resolved and validated
  # What load_sweep was given: a process training points together (`--together`) loads the sweep again from them.
  sweep_spec: str
  sweep_overrides: tuple[str, ...]
  not_read: frozenset[str] = frozenset()  # the command's `:arg` keys this point drops (NOT_READ)

  @property
  def stage_dirs(self) -> dict[str, str]:
    """{stage: its run folder relative to the point's folder}, laid out as `train.train_and_evaluate` does."""
    names = config_lib.ordered_keys(self.config.stages)
    return {name: name for name in names} if names else {"train": ""}


def load_sweep(spec: str, overrides: Sequence[str] = ()) -> list[Point]:
  """The points of `file.py[:arg]`'s `get_sweep(arg)`, each loaded with `load_config` (so a typo in any key fails
  here, before anything runs). `overrides` (`key=value`) apply to every point; one on a key the points set is
  refused, as the point's value would replace it."""
  sweep_spec, sweep_overrides = spec, tuple(overrides)
  path, _, arg = spec.partition(":")
  get_sweep = getattr(config_lib.import_config_file(path), "get_sweep", None)
  if get_sweep is None:
    raise FinetuneError(f"config file {path} has no get_sweep(arg=None) function; define one returning a list of "
                        "dicts {config key: value} (finetune.sweep.product, zipped and seeds build them)")
  raw, sweep_arg = _call_get_sweep(get_sweep, path, arg)
  # Every command of a sweep reads its points again (a re-run skipping finished points, --vmap's and --dry-run's
  # `--together` children, wandb agents): points drawn afresh on each call would be found nowhere (--vmap failed
  # every group) and re-runs would start new folders.
  if _comparable(raw) != _comparable(_call_get_sweep(get_sweep, path, arg)[0]):
    raise FinetuneError(f"get_sweep in {path} returns other points on each call (a random search without a fixed "
                        "seed?): draw them from a seeded generator, e.g. numpy.random.default_rng(0), so that "
                        "re-runs and the commands a sweep launches find the same points")
  if sweep_arg is not None and sweep_arg.sweep_only:
    # The sweep's own arguments (e.g. `seeds=3`) shape the list of points; get_config never sees them.
    kept = _arg_items_without(arg, sweep_arg.sweep_only)
    spec = f"{path}:{','.join(kept)}" if kept else path
  if not isinstance(raw, (list, tuple)):
    raise FinetuneError(f"get_sweep in {path} must return a list of dicts {{config key: value}}, got "
                        f"{type(raw).__name__}")
  if not raw:
    raise FinetuneError(f"get_sweep in {path} returned no points")
  for index, values in enumerate(raw):
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
      raise FinetuneError(f"get_sweep in {path}: point {index} is {values!r}, not a dict {{config key: value}}")
  # (Only the command's own arguments are dropped: one it does not give leaves the point's `:arg` as it is.)
  given = config_lib.arg_keys(arg)
  not_read = [{key[1:] for key, value in values.items() if value is NOT_READ and key[1:] in given}
              for values in raw]
  for index, values in enumerate(raw):
    misplaced = [key for key, value in values.items() if value is NOT_READ and not key.startswith(":")]
    if misplaced:
      raise FinetuneError(f"get_sweep in {path}: point {index} sets {misplaced[0]} to NOT_READ, which only a "
                          f"config-file argument takes (':{misplaced[0]}')")
  raw = [{key: _plain(value) for key, value in values.items() if value is not NOT_READ} for values in raw]
  swept = {key for values in raw for key in values if not key.startswith(":")}
  for override in overrides:  # the point's own value would replace it silently
    dotted = override.partition("=")[0]
    clash = next((key for key in sorted(swept) if f"{key}.".startswith(f"{dotted}.")
                  or f"{dotted}.".startswith(f"{key}.")), None)
    if clash is not None:
      raise FinetuneError(f"--config.{dotted} would not reach the points: the sweep sets {clash} in each of them; "
                          "drop the override, or change the values get_sweep gives")
  names = point_names(raw)
  _refuse_replaced_args(spec, raw, names)
  points, seen = [], {}
  for values, name, dropped in zip(raw, names, not_read):
    point_overrides = (*overrides, *(f"{k}={_value_text(v)}" for k, v in values.items() if not k.startswith(":")))
    try:
      point_spec = _with_config_args(spec, {k[1:]: v for k, v in values.items() if k.startswith(":")}, dropped)
      config = config_lib.load_config(point_spec, point_overrides)
    except FinetuneError as e:
      raise FinetuneError(f"sweep point {name}: {e}") from None
    points.append(Point(name, values, point_spec, tuple(point_overrides), config, sweep_spec, sweep_overrides,
                        frozenset(dropped)))
  for index, point in enumerate(points):
    resolved = config_lib.to_json(point.config)
    if resolved in seen:
      first = points[seen[resolved]]
      _refuse_an_override_that_merged(first, point, overrides)
      # (Entries equal as written get one name: the positions tell them apart.)
      raise FinetuneError(f"sweep points {first.name} and {point.name} (entries {seen[resolved]} and {index} of "
                          "get_sweep's list, from 0) resolve to the same config; drop one")
    seen[resolved] = index
  return points


def _refuse_an_override_that_merged(first: Point, second: Point, overrides: Sequence[str]) -> None:
  """Two points that resolve to one config because an override gave both the value their config-file arguments
  set apart (`--config.stages.ewc.regularize.ewc.weight=5` over the `:ewc_weight` points): names the override,
  which the check on swept config keys cannot see, instead of blaming the points."""
  if not overrides:
    return
  try:
    bare = [config_lib.load_config(point.config_spec, point.overrides[len(overrides):]) for point in (first, second)]
  except FinetuneError:  # (valid only with the overrides: nothing to compare)
    return
  for override in overrides:
    key = override.partition("=")[0]
    values = [_config_value(config, key) for config in bare]
    if values[0] != values[1]:
      raise FinetuneError(f"--config.{key} gives points {first.name} and {second.name} one value where their "
                          f"config-file arguments set {values[0]!r} and {values[1]!r}, so they would run the same "
                          "config; drop the override, or choose the points with get_sweep's own arguments")


def _config_value(config: ConfigDict, dotted: str) -> Any:
  node: Any = config
  for part in dotted.split("."):
    if not isinstance(node, ConfigDict) or part not in node:
      return None
    node = node[part]
  return node.to_dict() if isinstance(node, ConfigDict) else node


def parse_sweep_arg(arg: str | None, own: dict[str, Any], **shared: Any) -> ConfigDict:
  """get_sweep's `:arg`, parsed like `config.parse_arg` over the keys of `own` and `shared` together. The keys of
  `own` (e.g. `seeds`) are the sweep's alone: they choose the points and are removed from the `:arg` the points'
  get_config receives; `shared` keys (task, scale, ...) reach every point unchanged. As in `parse_arg`, a value
  takes its default's type, and a None default takes any literal: `seeds=None` accepts `:seeds=3` and
  `:seeds=(1,2)` alike (`seeds()` checks them).

      def get_sweep(arg=None):
        args = parse_sweep_arg(arg, own=dict(seeds=None), task="sst2")
        return product(..., seeds(args.seeds, default=1))
  """
  overlap = set(own) & set(shared)
  if overlap:
    raise FinetuneError(f"parse_sweep_arg: {', '.join(sorted(overlap))} both the sweep's own and shared; pick one")
  spec = {**shared, **own}
  for item in config_lib.split_config_arg(arg) if arg else ():
    key, sep, _ = item.partition("=")
    if item.strip() and not sep and key.strip() not in spec:
      # A bare word sets the first string argument, and the sweep's first string argument need not be its points'
      # (MiniLM's sweep read `:foo` as checkpoint=foo, each point as variant=foo).
      raise FinetuneError(f"sweep config argument {item.strip()!r} is not key=value; a sweep's arguments name "
                          f"their key (valid: {', '.join(spec)})")
  args = config_lib.parse_arg(arg, **spec)
  if isinstance(arg, config_lib.ConfigArg):
    arg.sweep_only = frozenset(own)
  return args


def _call_get_sweep(get_sweep: Any, path: str, arg: str) -> tuple[Any, config_lib.ConfigArg | None]:
  """(get_sweep's return value, the ConfigArg it was given), its errors as one line naming the config file."""
  sweep_arg = config_lib.ConfigArg(arg) if arg else None
  try:
    return (get_sweep(sweep_arg) if inspect.signature(get_sweep).parameters else get_sweep()), sweep_arg
  except FinetuneError:
    raise
  except Exception as e:  # A bug in the config file: name it in one line, as import_config_file does.
    message = " ".join(str(e).split("\n"))
    raise FinetuneError(f"{path}: get_sweep raised {type(e).__name__}: {message}{raised_at(e)}") from e


def _comparable(raw: Any) -> str:
  """get_sweep's points as text, for telling whether two calls gave the same ones."""
  if not isinstance(raw, (list, tuple)):
    return repr(type(raw))
  return repr([{key: "NOT_READ" if value is NOT_READ else repr(_plain(value)) for key, value in values.items()}
               if isinstance(values, dict) else repr(values) for values in raw])


def point_names(points: Sequence[dict[str, Any]]) -> list[str]:
  """Folder names, `key=value` joined by ',' (e.g. `learning_rate=0.001,seed=1`), each key shortened to its
  shortest dotted suffix that no other key of the sweep shares; characters outside [A-Za-z0-9._=,+-] become '_'.
  A name over 80 characters, or one two points share, keeps at most 60 and ends in a hash of the point's values."""
  keys = list(dict.fromkeys(key.lstrip(":") for point in points for key in point))
  short = {key: _shortest_suffix(key, keys) for key in keys}
  names = ["".join(c if c.isascii() and (c.isalnum() or c in "._=,+-") else "_" for c in
                   ",".join(f"{short[key.lstrip(':')]}={_name_text(value)}" for key, value in point.items()))
           or "default" for point in points]
  counts = collections.Counter(names)
  return [f"{name[:60]}-{_digest(point)}" if len(name) > _MAX_NAME or counts[name] > 1 else name
          for name, point in zip(names, points)]


def _shortest_suffix(key: str, keys: list[str]) -> str:
  parts = key.split(".")
  for n in range(1, len(parts)):
    if not any(other != key and other.split(".")[-n:] == parts[-n:] for other in keys):
      return ".".join(parts[-n:])
  return key


def _digest(point: dict[str, Any]) -> str:
  text = json.dumps(sorted((key, _value_text(value)) for key, value in point.items()))
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def _plain(value: Any) -> Any:
  """numpy values (np.logspace(...) in a get_sweep, also inside tuples, lists and dicts) as Python's: they would
  print as `np.float64(0.001)`, which no config reads back."""
  if hasattr(value, "tolist"):
    return value.tolist()
  if isinstance(value, (tuple, list)):
    return type(value)(_plain(v) for v in value)
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return value


def _value_text(value: Any) -> str:
  """`value` as override text, which config.py reads as a Python literal, else as a plain string."""
  if not isinstance(value, str):
    return repr(value)
  try:
    reads_as = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    reads_as = value
  return value if reads_as == value and value.strip().lower() not in ("true", "false") else repr(value)


def _name_text(value: Any) -> str:
  return value if isinstance(value, str) else repr(value).replace(" ", "")


def _refuse_replaced_args(spec: str, raw: list[dict[str, Any]], names: list[str]) -> None:
  """A `:key=value` of the command that a point sets to another value would be replaced in that point, silently
  (`:ewc_weight=5` ran the sweep's 10, 100, 1000; `:split=manmade` ran the random splits too); so would one whose
  config key of the same name a point overrides (`:seed=5` under the sweep's seed axis, which sets `seed`)."""
  def same(a: Any, b: Any) -> bool:  # as parse_arg would read them: 1 == 1.0, a list == a tuple
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
      return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b and isinstance(a, bool) == isinstance(b, bool)

  for item in config_lib.split_config_arg(spec.partition(":")[2]):
    key, _, text = (part.strip() for part in item.partition("="))
    given = config_lib.parse_literal(text)
    for swept in (f":{key}", key):
      replaced = [name for values, name in zip(raw, names)
                  if swept in values and not same(config_lib.parse_literal(values[swept]), given)]
      if replaced:
        break
    if replaced:
      raise FinetuneError(f":{key}={text} would not reach every point: get_sweep sets {swept} in point(s) "
                          f"{', '.join(replaced[:3])}{', ...' if len(replaced) > 3 else ''}; drop it, or choose the "
                          "points with get_sweep's own arguments (its docstring lists them)")


def _arg_items_without(arg: str, keys) -> list[str]:
  """The `key=value` items of a `:arg` text, less those whose key is in `keys`."""
  return [item for item in config_lib.split_config_arg(arg) if item and item.partition("=")[0].strip() not in keys]


def _with_config_args(spec: str, args: dict[str, Any], dropped: Iterable[str] = ()) -> str:
  """`file.py:a=1,c=4` with args {'a': 2, 'b': 3} and dropped {'c'} -> `file.py:a=2,b=3` (the point's value
  replaces the command's; where they differ, load_sweep has refused the command first)."""
  dropped = set(dropped)
  if not args and not dropped:
    return spec
  path, _, arg = spec.partition(":")
  kept = _arg_items_without(arg, {*args, *dropped})
  kept += [f"{key}={_arg_value_text(key, value)}" for key, value in args.items()]
  return f"{path}:{','.join(kept)}" if kept else path


def _arg_value_text(key: str, value: Any) -> str:
  """`value` as the text after `key=` in a `:arg`, such that parse_arg reads back exactly `value`: one item for
  split_config_arg (commas split items outside brackets and quotes, and a lone quote or bracket is an error), then
  the same literal. A plain string stays bare (`variant=ewc`), any other is quoted."""
  if isinstance(value, str):
    # (Bare only where a reader sees the value: not empty, no separator, quote, edge space or control character.)
    plain = value and value.isprintable() and value == value.strip() and not set(value) & set(",()[]{}'\"")
    bare = [_value_text(value)] if plain else []
    candidates = [*bare, _quoted(value)]
  else:
    candidates = [repr(value)]
  for text in candidates:
    if _reads_back(text, value):
      return text
  raise FinetuneError(f"sweep value {value!r} of config-file argument ':{key}' has no `:{key}=...` text that reads "
                      "back as the same value; sweep a simpler value (a number, string, or tuple of them)")


def _quoted(text: str) -> str:
  """`text` as a Python string literal that split_config_arg reads as one item. It knows no backslash escapes, so
  a quote inside a literal must be of the other kind; a string holding both kinds becomes adjacent literals, which
  Python joins (`'say "hi", it'"'s"` is `say "hi", it's`)."""
  pieces = [""]
  for char in text:
    if char in "'\"" and ({"'", '"'} - {char}) & set(pieces[-1]):
      pieces.append("")
    pieces[-1] += char
  return "".join(repr(piece) for piece in pieces)


def _reads_back(text: str, value: Any) -> bool:
  try:
    items = config_lib.split_config_arg(text)
  except FinetuneError:  # an unclosed quote or bracket
    return False
  read = config_lib.parse_literal(text)  # (parse_arg's reading of a value)
  return items == [text] and type(read) is type(value) and read == value


# ---------------------------------------------------------------------------------------------------- running


def train_argv(point: Point, workdir: str) -> list[str]:
  """The `finetune train ...` arguments (after `finetune`) that run `point` in `<workdir>/<point name>`."""
  return ["train", "--config", point.config_spec, "--workdir", os.path.join(workdir, point.name),
          *(f"--config.{override}" for override in point.overrides)]


def dry_run_commands(points: Sequence[Point], workdir: str, vmap: int = 1) -> list[str]:
  """One shell-quoted `finetune train ...` line per point, for a cluster scheduler or a pod launcher; with
  `vmap` > 1 one `finetune sweep ... --together` line per group of points that train together."""
  return [shlex.join(["finetune", *(train_argv(group[0], workdir) if len(group) == 1 else
                                    together_argv(group, workdir))])
          for group in plan_groups(points, vmap)]


def finished(point: Point, workdir: str) -> bool:
  """Every stage's summary.json exists, and `finetune train` would accept the folder as this point's run: after,
  say, a change of the command's `:arg`, the folder of the point's name holds another experiment."""
  # train's own test of "same experiment" (it ignores resumable keys such as wandb.* and keys added since).
  from finetune.train import SUMMARY_FILE, check_same_config  # pylint: disable=g-import-not-at-top
  run_dir = os.path.join(workdir, point.name)
  for name, stage_cfg in config_lib.stage_configs(point.config):
    stage_dir = os.path.join(run_dir, point.stage_dirs[name])
    if not os.path.isfile(os.path.join(stage_dir, SUMMARY_FILE)):
      return False
    try:
      check_same_config(os.path.join(stage_dir, "config.json"), stage_cfg)
    except FinetuneError:
      return False
  return True


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What became of one point: 'finished' (ran now), 'skipped' (finished earlier) or 'failed'."""

  point: Point
  status: str
  returncode: int = 0
  seconds: float = 0.0
  log_tail: tuple[str, ...] = ()
  log_path: str = ""  # where its output is: the first point's sweep.log, for points trained together


def together_argv(group: Sequence[Point], workdir: str) -> list[str]:
  """The `finetune sweep ... --together a --together b` arguments that train `group` in one program
  (finetune/vmap.py): the sweep loaded as it was, then the group's points picked by name."""
  spec, overrides = group[0].sweep_spec, group[0].sweep_overrides
  return ["sweep", "--config", spec, "--workdir", workdir, *(arg for p in group for arg in ("--together", p.name)),
          *(f"--config.{override}" for override in overrides)]


def plan_groups(points: Sequence[Point], vmap: int) -> list[list[Point]]:
  """The points in groups of at most `vmap` that can train together (`finetune.vmap.groups`); singletons alone."""
  _check_vmap(vmap)
  if vmap == 1:
    return [[point] for point in points]
  from finetune import vmap as vmap_lib  # pylint: disable=g-import-not-at-top  (imports jax)
  configs = [p.config for p in points]
  grouped = vmap_lib.groups(configs, vmap)
  # Why a group did not join the first one (beyond its size): a sweep that fell back to solo runs said nothing.
  reasons = {}
  for group in grouped[1:]:
    reason = vmap_lib.incompatibility(configs[grouped[0][0]], configs[group[0]])
    if reason:
      reasons.setdefault(reason, (points[grouped[0][0]].name, points[group[0]].name))
  for reason, (first, other) in list(reasons.items())[:5]:
    print(f"--vmap: {other} trains apart from {first}: {reason}", file=sys.stderr, flush=True)
  if len(reasons) > 5:
    print(f"--vmap: and {len(reasons) - 5} more reasons to train apart", file=sys.stderr, flush=True)
  return [[points[i] for i in group] for group in grouped]


def _check_vmap(vmap: int) -> None:
  if vmap < 1:
    raise FinetuneError(f"--vmap {vmap}: train at least one point per program; pass --vmap 1 or more")


def check_workdir(points: Sequence[Point], workdir: str) -> None:
  """Refuses a sweep folder whose point folders hold runs of other configs (say, the sweep re-run with another
  --config.key or :arg, or with stages added), before anything is written: each point would fail on it in
  `finetune train`, after points.json and the results had been overwritten with a table of incomplete rows. The
  test is train's own (`train.check_workdir`), so a run that had not progressed, or a changed resumable key,
  passes."""
  from finetune.train import check_workdir as check_point_workdir  # pylint: disable=g-import-not-at-top
  differing = []  # (point, its error)
  for point in points:
    try:
      check_point_workdir(point.config, os.path.join(workdir, point.name))
    except FinetuneError as e:
      differing.append((point, e))
  if differing:
    point, error = differing[0]
    more = f" (and {len(differing) - 1} more of the {len(points)} points)" if len(differing) > 1 else ""
    raise FinetuneError(f"sweep point {point.name}{more}: {error} (nothing was run or written)")


def check_point_names(points: Sequence[Point], names: Sequence[str], what: str = "only") -> None:
  """Every name in `names` (a list: a lone string would match by substring) names a point of the sweep."""
  if isinstance(names, str):
    raise FinetuneError(f"{what}: give a list of point names, not the string {names!r}")
  unknown = [name for name in names if name not in {point.name for point in points}]
  if unknown:
    raise FinetuneError(f"{what}: no point named {unknown[0]!r} in this sweep; points: "
                        f"{', '.join(point.name for point in points)}")


def run_sweep(points: Sequence[Point], workdir: str, parallel: int = 1, vmap: int = 1,
              only: Sequence[str] = ()) -> list[Outcome]:
  """Runs every unfinished point as `python -m finetune train` in `<workdir>/<point name>`, up to `parallel` at a
  time, its output appended to `sweep.log` there; writes points.json first. A failed point does not stop the
  others. Prints a line per start, skip and end. `only`: the names of the points to run (`--only`; the others are
  neither run nor counted, and points.json still lists every point).

  `vmap` > 1: unfinished points that can train together (same shapes; they differ only in seed, learning rate or
  regularizer strength, finetune/vmap.py) run in groups of up to `vmap` as one process and one jitted program,
  `finetune sweep --config <the sweep's spec> --together a --together b ...` (the group's output goes to the
  first point's sweep.log)."""
  # Every refusal before the first write: a run that stops here leaves the folder as it was.
  if parallel < 1:
    raise FinetuneError(f"--parallel {parallel}: run at least one point at a time; pass --parallel 1 or more")
  _check_vmap(vmap)
  check_point_names(points, only)
  chosen = [p for p in points if p.name in only] if only else list(points)
  check_workdir(chosen, workdir)
  os.makedirs(workdir, exist_ok=True)
  files.write_text(os.path.join(workdir, POINTS_FILE), json.dumps(
      [{"name": p.name, "values": p.values, "config": p.config_spec, "overrides": list(p.overrides),
        "command": command} for p, command in zip(points, dry_run_commands(points, workdir))], indent=2, default=str))
  env = dict(os.environ, PYTHONUNBUFFERED="1")  # so `tail -f sweep.log` follows a running point
  memory_settings = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION")
  if parallel > 1 and not any(name in env for name in memory_settings):
    # On a GPU each process would reserve 75% of its memory at the first operation and the second would run out
    # (JAX's "GPU memory allocation" notes); unless told how to share it, allocate on demand.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  lock, counts = threading.Lock(), collections.Counter()
  running: set[subprocess.Popen] = set()
  interrupted = threading.Event()

  def say(message: str) -> None:
    with lock:
      print(f"[{counts['done']}/{len(chosen)} done, {counts['failed']} failed] {message}", flush=True)

  def run(group: list[Point]) -> list[Outcome]:
    names = ", ".join(p.name for p in group)
    say(f"running {names}" + (f" together ({len(group)} points, one program)" if len(group) > 1 else ""))
    if len(group) == 1:
      command = [sys.executable, "-m", "finetune", *train_argv(group[0], workdir)]
    else:
      command = [sys.executable, "-m", "finetune", *together_argv(group, workdir)]
    log_path = os.path.join(workdir, group[0].name, LOG_FILE)
    for point in group:
      os.makedirs(os.path.join(workdir, point.name), exist_ok=True)
      if point is not group[0]:
        with open(os.path.join(workdir, point.name, LOG_FILE), "a") as log:
          log.write(f"(trained together with {names}: output in {log_path})\n")
    began = time.perf_counter()
    with open(log_path, "a") as log:
      log.write(f"$ {shlex.join(command)}\n")
      log.flush()
      with lock:
        if interrupted.is_set():  # Ctrl-C / SIGTERM came while this thread was getting ready: start nothing
          return []
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        running.add(process)
      try:
        returncode = process.wait()
      finally:
        with lock:
          running.discard(process)
    seconds = time.perf_counter() - began
    with open(log_path, errors="replace") as log:
      tail = tuple(line.rstrip() for line in log.readlines()[-8:] if line.strip())
    outcomes = []
    for point in group:
      if finished(point, workdir):
        outcomes.append(Outcome(point, "finished", returncode, seconds, log_path=log_path))
      else:
        note = ("(it exited 0, yet its summary.json files are missing or were written for another config)",) \
            if returncode == 0 else ()
        outcomes.append(Outcome(point, "failed", returncode or 1, seconds, tail + note, log_path))
    return outcomes

  def run_and_report(group: list[Point]) -> list[Outcome]:
    outcomes = run(group)
    if interrupted.is_set():  # its points were stopped on purpose: not failures to report
      return []
    for outcome in outcomes:
      point = outcome.point
      with lock:  # (counted and printed here, before this thread starts another group, so lines come in order)
        counts["done"] += 1
        counts["failed"] += outcome.status == "failed"
      if outcome.status == "finished":
        say(f"finished {point.name} in {outcome.seconds:.1f} s")
      else:
        say(f"FAILED {point.name} (exit status {outcome.returncode}); last lines of {outcome.log_path}:\n" +
            "\n".join(f"    {line}" for line in outcome.log_tail))
    return outcomes

  outcomes = {}
  todo = []
  for point in chosen:
    if finished(point, workdir):
      counts["done"] += 1
      outcomes[point.name] = Outcome(point, "skipped")
      say(f"skipped (finished) {point.name}")
    else:
      todo.append(point)
  pool = concurrent.futures.ThreadPoolExecutor(parallel)
  try:
    futures = set(pool.submit(run_and_report, group) for group in plan_groups(todo, vmap))
    while futures:
      # Waits a second at a time so that a Ctrl-C a library dropped is still seen (finetune/interrupts.py).
      done, futures = concurrent.futures.wait(futures, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        for outcome in future.result():
          outcomes[outcome.point.name] = outcome
      interrupts.raise_if_requested()
  except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI raises it for both)
    # A terminal's Ctrl-C reaches the running points too (one process group), but `kill PID` or a container's
    # SIGTERM reaches only this process: pass SIGTERM on, which each `finetune train` ends on cleanly, after the
    # checkpoint it is writing (a point that gets both takes them as one request: finetune/interrupts.py). Without
    # it the sweep waited for them to finish.
    with lock:
      interrupted.set()
      for process in running:
        if process.poll() is None:
          process.terminate()
    raise
  finally:
    pool.shutdown(cancel_futures=True)  # start nothing more; wait for the running points to end
  return [outcomes[point.name] for point in chosen]


# ------------------------------------------------------------------------------------------------ aggregation


def collect(points: Sequence[Point], workdir: str, metrics: Sequence[str] = ()) -> tuple[list[str], list[dict]]:
  """(metric columns, one row per point). A row holds `point`, the point's values by key, `status` ('finished' or
  'incomplete') and a `<stage>/<metric>` column per stage and metric found.

  A metric is a '/'-path into a stage's summary.json: `test/accuracy` (short for `final/test/accuracy`),
  `forgetting/pretrain/test/drop`, `train_examples_per_s`. The default is every evaluated split's accuracy."""
  from finetune.reporting import read_json  # pylint: disable=g-import-not-at-top
  from finetune.train import SUMMARY_FILE  # pylint: disable=g-import-not-at-top
  summaries = {}  # point name -> {stage: summary}
  for point in points:
    if finished(point, workdir):
      summaries[point.name] = {}
      for stage, stage_dir in point.stage_dirs.items():
        path = os.path.join(workdir, point.name, stage_dir, SUMMARY_FILE)
        summary = read_json(path)
        if not isinstance(summary, dict) or not isinstance(summary.get("final"), dict):
          raise FinetuneError(f"{path} is not a run summary (no 'final' evaluations); restore it, or delete its run "
                              "folder to redo that run")
        summaries[point.name][stage] = summary
  every_summary = [s for stages in summaries.values() for s in stages.values()]
  metrics = list(metrics) or list(dict.fromkeys(f"{split}/accuracy" for s in every_summary for split in s["final"]))
  for metric in metrics:
    if every_summary and all(_metric(s, metric) is None for s in every_summary):
      raise FinetuneError(f"metric {metric!r} is a number in no stage summary under {workdir}; metrics are paths "
                          f"into summary.json such as {', '.join(_example_metrics(every_summary[0]))}")
  stages = list(dict.fromkeys(stage for stages in summaries.values() for stage in stages))
  columns = [f"{stage}/{metric}" for stage in stages for metric in metrics
             if any(_metric(s.get(stage, {}), metric) is not None for s in summaries.values())]
  rows = []
  for point in points:
    row = {"point": point.name, **point.values, "status": "finished" if point.name in summaries else "incomplete"}
    for column in columns:
      stage, _, metric = column.partition("/")
      row[column] = _metric(summaries.get(point.name, {}).get(stage, {}), metric)
    rows.append(row)
  return columns, rows


def aggregate(points: Sequence[Point], workdir: str, metrics: Sequence[str] = (), seed_key: str = "seed") -> str:
  """Writes `results.csv` (one row per point) and `results.md` (points that differ only in `seed_key` grouped:
  mean ± sample standard deviation, and n); returns the markdown table."""
  check_seed_key(points, seed_key)
  columns, rows = collect(points, workdir, metrics)
  keys = list(dict.fromkeys(key for point in points for key in point.values))
  text = io.StringIO()
  writer = csv.writer(text)
  writer.writerow(["point", *keys, "status", *columns])
  for row in rows:
    writer.writerow([row["point"], *(_csv_text(row.get(key)) for key in keys), row["status"],
                     *("" if row[c] is None else row[c] for c in columns)])
  files.write_text(os.path.join(workdir, "results.csv"), text.getvalue())
  table = grouped_table(rows, [key for key in keys if key != seed_key], columns)
  finished_count = sum(row["status"] == "finished" for row in rows)
  files.write_text(os.path.join(workdir, "results.md"),
         f"# Sweep results\n\n{len(rows)} points in {workdir}, {finished_count} finished. Cells are the mean ± sample "
         f"standard deviation over `{seed_key}` of the n finished runs (one run: its value); a cell's own (n=k): "
         "only k of them have a finite value there, the mean is over those and the others are counted beside it "
         f"(nan, inf); '-' for a key: the points do not set it.\n\n{table}\n")
  return table


def check_seed_key(points: Sequence[Point], seed_key: str) -> None:
  """A `seed_key` that is no key of any point would silently average nothing: an error. The default 'seed' is
  allowed regardless, for a sweep without seeds (each point is then its own row)."""
  keys = list(dict.fromkeys(key for point in points for key in point.values))
  if seed_key != "seed" and seed_key not in keys:
    fix = f"pass one of: {', '.join(keys)}" if keys else "the points set no keys, so leave --seed-key out"
    raise FinetuneError(f"--seed-key {seed_key!r} is no key of this sweep's points, so results.md would average "
                        f"nothing; {fix}")


def grouped_table(rows: Sequence[dict], keys: Sequence[str], columns: Sequence[str]) -> str:
  """A markdown table with a row per distinct combination of `keys` (first appearance order) over finished rows."""
  groups = collections.defaultdict(list)
  for row in rows:
    groups[tuple(_csv_text(row.get(key)) for key in keys)].append(row)
  lines = ["| " + " | ".join([*keys, *columns, "n"]) + " |", "|" + "---|" * (len(keys) + len(columns) + 1)]
  for values, members in groups.items():
    done = [row for row in members if row["status"] == "finished"]
    key_cells = [(value or "-").replace("|", "\\|") for value in values]  # (a bare '|' would end the cell)
    means = [_cell([row[c] for row in done if row[c] is not None], len(done)) for c in columns]
    lines.append("| " + " | ".join([*key_cells, *means, str(len(done))]) + " |")
  return "\n".join(lines)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
  """(mean, sample standard deviation) of `values`, the spread every table here reports; one value has std 0.
  With a nan or inf among several, the mean is what float arithmetic gives (nan, or that inf) and the std nan;
  results.md leaves them out of its means and counts them instead."""
  values = list(values)
  if not values:
    raise ValueError("mean_std of no values")
  if len(values) == 1:
    return values[0], 0.0
  if not all(math.isfinite(v) for v in values):  # (statistics' exact arithmetic fails on them)
    return sum(values) / len(values), math.nan
  return statistics.mean(values), statistics.stdev(values)


def read_results(csv_path: str) -> list[dict[str, str]]:
  """The finished rows of a sweep's `results.csv` (as `aggregate` wrote it), for the experiments' plot scripts and
  notebooks. Raises ValueError when no point finished."""
  with open(csv_path, newline="") as f:
    rows = [row for row in csv.DictReader(f) if row.get("status") == "finished"]
  if not rows:
    raise ValueError(f"{csv_path} has no finished points")
  return rows


def number(text: str | None) -> float | None:
  """A results.csv cell as a float; None for an empty cell (a metric the stage did not report)."""
  return None if text in (None, "") else float(text)


def _cell(values: list[float], runs: int) -> str:
  """A results.md cell: a column's values over a group's `runs` finished runs. Non-finite values (a diverged
  seed's nan loss) are left out of the mean and std, which would be nan and hide the other seeds, and shown
  beside them with their count: `0.5000 ± 0.0100 (n=2, 1 nan)`. (n=k) says the mean is over k values, fewer than
  the row's n (a run that did not report the metric, or a non-finite value)."""
  finite = [v for v in values if math.isfinite(v)]
  non_finite = collections.Counter(repr(float(v)) for v in values if not math.isfinite(v))  # 'nan', 'inf', '-inf'
  if not finite:
    return ", ".join(label if count == 1 else f"{count} {label}" for label, count in non_finite.items()) or "-"
  notes = [f"n={len(finite)}"] if len(finite) != runs else []
  notes += [f"{count} {label}" for label, count in non_finite.items()]
  return _mean_std_text(finite) + (f" ({', '.join(notes)})" if notes else "")


def _mean_std_text(values: list[float]) -> str:
  if not values:
    return "-"
  mean, std = mean_std(values)
  digits = _decimals(float(mean), float(std))
  style = f",.{digits}f" if digits <= 8 else ".3g"  # (eight zeros after the point: unreadable, in exponent form)
  if len(values) == 1:
    return f"{mean:{style}}"
  return f"{mean:{style}} ± {std:{style}}"


def _decimals(mean: float, std: float) -> int:
  """Decimals to print a mean and std with: none for whole numbers (counts, steps); else four below 1000
  (accuracies, losses) and none from 1000 (throughputs), but always enough for two significant digits of the std
  and of a small mean, so that neither rounds to another value ([2, 3] is 2.5000 ± 0.7071, not 2 ± 1)."""
  if not (math.isfinite(mean) and math.isfinite(std)) or (mean.is_integer() and std.is_integer()):
    return 0
  digits = 4 if abs(mean) < 1000 else 0
  for value in (std, abs(mean)):
    if 0 < value < 1000:
      digits = max(digits, 1 - math.floor(math.log10(value)))
  return digits


def _csv_text(value: Any) -> str:
  if value is None:
    return ""
  return value if isinstance(value, str) else repr(value)


def _metric(summary: dict, metric: str) -> float | None:
  node: Any = summary
  parts = metric.split("/")
  if parts[0] not in summary:
    node = summary.get("final", {})
  for part in parts:
    node = node.get(part) if isinstance(node, dict) else None
  return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def _example_metrics(summary: dict) -> list[str]:
  examples = [f"{split}/{key}" for split, values in summary["final"].items() for key in values][:3]
  for source, splits in summary.get("forgetting", {}).items():
    examples += [f"forgetting/{source}/{split}/drop" for split in splits][:1]
  return examples + ["train_examples_per_s"]


# ----------------------------------------------------------------------------------------------------- wandb


def wandb_sweep(points: Sequence[Point], workdir: str) -> dict[str, Any]:
  """A wandb sweep definition (method: grid) running the same points, for `wandb sweep` + `wandb agent`.

  wandb's grid runs every combination of per-parameter values. Where the points are exactly such a product
  (`product(...)` is), each swept key is a parameter, passed as `--<parameter>=<value>`: a config key is parameter
  `config.<key>` (`--config.seed=1` is an override as it stands), a config-file argument `:<key>` is parameter
  `arg.<key>`, whose value is the text after `<key>=` in the `:arg` and which the run's shell script folds into
  `--config file.py:<key>=<value>`. Each run's workdir is `<workdir>/wandb/<wandb run id>`, which is only known
  when the agent starts the run; both need the `sh -c` in the command.

  Any other list of points (a `zipped(...)` sweep, or one whose points drop arguments) is one parameter, `only`,
  whose values are the point names: each run is `finetune sweep ... --only=<name>`, which trains that point in
  `<workdir>/<name>` as the sweep would, so `finetune sweep --aggregate-only` tabulates the agents' runs."""
  spec, overrides = points[0].sweep_spec, points[0].sweep_overrides
  keys = list(dict.fromkeys(key for point in points for key in point.values))
  axes = {key: {_value_text(p.values[key]): p.values[key] for p in points if key in p.values} for key in keys}
  grid = set(itertools.product(*axes.values()))  # (over the value texts)
  given = {tuple(_value_text(p.values[k]) for k in keys) for p in points if all(k in p.values for k in keys)}
  wandb_cfg = points[0].config.wandb
  definition = {"name": os.path.basename(os.path.normpath(workdir)), "project": wandb_cfg.project}
  if wandb_cfg.entity:
    definition["entity"] = wandb_cfg.entity
  definition.update({"program": spec.partition(":")[0],  # informational: the command below says how it runs
                     "method": "grid"})
  # (A point that drops a command argument, NOT_READ, needs its own spec: no shared base spec serves it.)
  if given != grid or len(points) != len(grid) or any(point.not_read for point in points):
    definition.update({
        "parameters": {"only": {"values": [point.name for point in points]}},
        "command": ["${env}", "python", "-m", "finetune", "sweep", "--config", spec, "--workdir", workdir,
                    "--config.wandb.mode=online", *(f"--config.{override}" for override in overrides), "${args}"],
    })
    return definition
  # The spec every run starts from: a point's own (the command's `:arg` less the sweep's own arguments, `seeds=`,
  # which get_config refuses) less the swept `:` arguments, which each run adds back from its wandb parameters.
  file_args = [key[1:] for key in keys if key.startswith(":")]
  path, _, arg = points[0].config_spec.partition(":")
  kept = _arg_items_without(arg, file_args)
  base_spec = f"{path}:{','.join(kept)}" if kept else path
  parameters = {}
  for key in keys:
    if key.startswith(":"):
      parameters[f"arg.{key[1:]}"] = {"values": [_arg_value_text(key[1:], v) for v in axes[key].values()]}
    else:
      parameters[f"config.{key}"] = {"values": [_wandb_value(v) for v in axes[key].values()]}
  # sh's $0 is 'finetune' and "$@" wandb's arguments: `--arg.k=v` ones are appended to the spec (`:` before the
  # first argument, `,` between), the rest stay. (`for a do` reads the arguments once, so `set --` may rebuild them.)
  fold = (f"spec={shlex.quote(base_spec)}; sep={':' if not kept else ','}; "
          'for a do shift; case "$a" in --arg.*) spec="$spec$sep${a#--arg.}"; sep=,;; *) set -- "$@" "$a";; esac; '
          "done; ") if file_args else ""
  run = fold + " ".join(["exec python -m finetune train --config", '"$spec"' if file_args else shlex.quote(base_spec),
                         "--workdir", shlex.quote(os.path.join(workdir, "wandb")) + '/"$WANDB_RUN_ID"',
                         "--config.wandb.mode=online",
                         *(shlex.quote(f"--config.{override}") for override in overrides), '"$@"'])
  definition.update({
      "parameters": parameters,
      "command": ["${env}", "sh", "-c", run, "finetune", "${args}"],
  })
  return definition


def write_wandb_sweep(path: str, points: Sequence[Point], workdir: str):
  """Writes `wandb_sweep(...)` as YAML with a comment saying how to start it."""
  import yaml  # pylint: disable=g-import-not-at-top  (PyYAML comes with transformers and datasets)
  definition = wandb_sweep(points, workdir)
  header = (f"# {len(points)} points of {points[0].sweep_spec} as a wandb grid sweep. "
            "From the directory `finetune sweep` ran in:\n"
            f"#   wandb sweep {path}   # prints the sweep id\n#   wandb agent <entity/project/sweep id>\n")
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  files.write_text(path, header + yaml.safe_dump(definition, sort_keys=False, width=1000))


def _wandb_value(value: Any) -> Any:
  """A parameter value the agent passes as `--config.key={str(value)}` and the override reads back as `value`."""
  if isinstance(value, str):  # a string reading as another literal ('True', '1') goes as its quoted text
    return _value_text(value)
  # YAML has lists, not tuples; the override reads a list back and the config turns it into its tuple. (Inside a
  # list, str() quotes strings itself.)
  return [_wandb_value(v) if not isinstance(v, str) else v for v in value] if isinstance(value, (list, tuple)) \
      else value
