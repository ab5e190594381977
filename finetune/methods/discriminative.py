"""Discriminative learning rates (Howard & Ruder 2018; fastai's `slice`): one peak learning rate per layer group.

* `config.optimizer.lr_range = (lo, hi)`: group i of n gets lo * (hi/lo)^(i/(n-1)) (geometric, input to output);
* `config.optimizer.lr_factor = f`: group i gets lr / f^(n-1-i), the top group `lr` (ULMFiT: f = 2.6; layer-wise
  LR decay for transformers is the same with f = 1/decay);
* `config.optimizer.lr_multipliers = ((regex, m), ...)`: parameters matching a regex get m x their group's rate.
They compose: the group rate from range or factor, times the first matching regex multiplier.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from ml_collections import ConfigDict

from finetune.errors import FinetuneError
from finetune.partition import require_matches


def check_settings(opt_cfg: ConfigDict) -> None:
  """lr_range and lr_factor as `group_peak_lrs` needs them (also run by the config check, before any stage)."""
  if opt_cfg.lr_range and opt_cfg.lr_factor:
    raise FinetuneError("set only one of config.optimizer.lr_range and config.optimizer.lr_factor")
  if opt_cfg.lr_range:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in opt_cfg.lr_range)
    if len(opt_cfg.lr_range) != 2 or not numbers or not 0 < opt_cfg.lr_range[0] <= opt_cfg.lr_range[1]:
      raise FinetuneError(f"config.optimizer.lr_range={tuple(opt_cfg.lr_range)} must be (lo, hi) with 0 < lo <= hi")
  if opt_cfg.lr_factor and opt_cfg.lr_factor <= 0:
    raise FinetuneError("config.optimizer.lr_factor must be > 0 (ULMFiT uses 2.6)")


def group_peak_lrs(opt_cfg: ConfigDict, groups: Sequence[str]) -> dict[str, float]:
  """{group: peak learning rate}."""
  n = len(groups)
  check_settings(opt_cfg)
  if opt_cfg.lr_range:
    lo, hi = (float(v) for v in opt_cfg.lr_range)
    return {g: lo * (hi / lo) ** (i / (n - 1)) if n > 1 else hi for i, g in enumerate(groups)}
  if opt_cfg.lr_factor:
    return {g: opt_cfg.learning_rate / opt_cfg.lr_factor ** (n - 1 - i) for i, g in enumerate(groups)}
  return {g: opt_cfg.learning_rate for g in groups}


def path_multipliers(opt_cfg: ConfigDict, paths: Sequence[str]) -> dict[str, float]:
  """{path: multiplier from config.optimizer.lr_multipliers} (1.0 where no regex matches; first match wins)."""
  # (Each entry's form, (regex, multiplier > 0), is checked with the config: config.validate.)
  rules = [(re.compile(pattern), float(multiplier)) for pattern, multiplier in opt_cfg.lr_multipliers]
  require_matches([r[0] for r in opt_cfg.lr_multipliers], list(paths), "config.optimizer.lr_multipliers")
  result, first_matches = {}, set()
  for path in paths:
    index = next((i for i, (regex, _) in enumerate(rules) if regex.search(path)), None)
    result[path] = 1.0 if index is None else rules[index][1]
    first_matches.add(index)
  for index, rule in enumerate(opt_cfg.lr_multipliers):
    if index not in first_matches:  # (it matched only parameters an earlier rule had taken: it did nothing)
      raise FinetuneError(f"config.optimizer.lr_multipliers rule {tuple(rule)!r} sets no rate: every parameter it "
                          "matches matches an earlier rule, and the first match wins; reorder or narrow the rules")
  return result


def describe(peaks: Mapping[str, float]) -> str:
  return ", ".join(f"{g}={lr:.3g}" for g, lr in peaks.items())
