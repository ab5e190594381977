"""Freezing: parameters that receive no update, no optimizer state and (where avoidable) no gradient.

Two ways to say it, which combine: regexes over parameter paths (`config.freeze.patterns`), and Yosinski's
"frozen n" (`config.freeze.first_n`: the first n layer groups, input side). With `config.freeze.train_bn` (fastai's
`train_bn`) BatchNorm scales and biases inside frozen groups stay trainable and their statistics keep updating;
without it a frozen BatchNorm runs in inference mode, so its statistics stay exactly as loaded.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from ml_collections import ConfigDict

from finetune.errors import FinetuneError
from finetune.partition import require_matches


def frozen_paths(freeze_cfg: ConfigDict, groups: Sequence[str], group_of: Mapping[str, str],
                 batch_norm_params: set[str]) -> frozenset[str]:
  """The parameter paths frozen for the whole stage."""
  paths = list(group_of)
  if freeze_cfg.first_n < 0 or freeze_cfg.first_n > len(groups):
    raise FinetuneError(f"config.freeze.first_n={freeze_cfg.first_n} but the model has {len(groups)} layer groups "
                        f"({', '.join(groups)}); use 0..{len(groups) - 1} ({len(groups)} freezes every group, "
                        "which leaves only BatchNorm training, with config.freeze.train_bn=True)")
  require_matches(freeze_cfg.patterns, paths, "config.freeze.patterns")
  frozen_groups = set(groups[:freeze_cfg.first_n])
  matches = [{p for p in paths if re.search(pattern, p)} for pattern in freeze_cfg.patterns]
  # (A rule that adds nothing is a mistake, as one that matches nothing.)
  for pattern, matched in zip(freeze_cfg.patterns, matches):
    if frozen_groups and all(group_of[p] in frozen_groups for p in matched):
      raise FinetuneError(f"config.freeze.patterns: {pattern!r} matches only parameters of the groups "
                          f"config.freeze.first_n={freeze_cfg.first_n} freezes already "
                          f"({', '.join(groups[:freeze_cfg.first_n])}); drop the pattern or lower first_n")
  for i, pattern in enumerate(freeze_cfg.patterns if len(matches) > 1 else ()):  # (a copy, or one inside another)
    others = set().union(*(m for j, m in enumerate(matches) if j != i))
    if matches[i] <= others:
      covering = [other for j, other in enumerate(freeze_cfg.patterns) if j != i and matches[j] & matches[i]]
      raise FinetuneError(f"config.freeze.patterns: {pattern!r} adds nothing to {', '.join(map(repr, covering))}, "
                          "which freeze(s) everything it matches already; drop it, or narrow the other")
  frozen = {p for p in paths if group_of[p] in frozen_groups}.union(*matches)
  if freeze_cfg.train_bn:
    if not batch_norm_params:  # (taken silently: a ViT or a BERT has LayerNorm, which freezes like any layer)
      raise FinetuneError("config.freeze.train_bn=True but the model has no BatchNorm layer, so it changes nothing; "
                          "drop it (LayerNorm parameters freeze with their group)")
    for pattern, matched in zip(freeze_cfg.patterns, matches):
      if all(p in batch_norm_params for p in matched):  # (train_bn undid it: the pattern froze nothing)
        raise FinetuneError(f"config.freeze.patterns: {pattern!r} matches only BatchNorm parameters, which "
                            "config.freeze.train_bn keeps training; drop the pattern or train_bn")
    frozen -= batch_norm_params
  if len(frozen) == len(paths):
    raise FinetuneError("every parameter is frozen (config.freeze); leave at least one group trainable")
  return frozenset(frozen)
