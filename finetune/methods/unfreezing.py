"""Gradual unfreezing (ULMFiT) and chain-thaw (Felbo et al. 2017) as a list of phases.

A phase is (first step, trainable groups). Gradual: the top `initial_groups` groups train first, and every k steps
(or epochs) the next group below joins, until every group not frozen for the stage trains. Chain-thaw: the top
groups first, then each lower group alone from the input side up, then all together, k steps each.

Design: the train step is compiled once per phase, for exactly the groups that train in it, so frozen groups cost
no backward pass and no optimizer state at any time; at a boundary the optimizer state of groups that were already
training is carried over unchanged (each group has its own optax partition entry) and new groups start fresh. The
alternative — one program with masks switched at run time — would differentiate and store moments for every group
from step 0. A few recompiles (one per group) are cheap next to that.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ml_collections import ConfigDict

from finetune.errors import FinetuneError


@dataclasses.dataclass(frozen=True)
class Phase:
  start: int  # first step of the phase
  trainable_groups: tuple[str, ...]


def phases(unfreeze_cfg: ConfigDict, groups: Sequence[str], unfreezable: Sequence[str], total_steps: int,
           steps_per_epoch: int) -> tuple[Phase, ...]:
  """The stage's phases. `unfreezable`: the groups with at least one parameter not frozen for the whole stage."""
  order = [g for g in groups if g in unfreezable]
  if unfreeze_cfg.mode == "none":
    return (Phase(0, tuple(order)),)
  if unfreeze_cfg.mode not in ("gradual", "chain_thaw"):
    raise FinetuneError(f"config.unfreeze.mode={unfreeze_cfg.mode!r}; valid: none, gradual, chain_thaw")
  if bool(unfreeze_cfg.every_steps) == bool(unfreeze_cfg.every_epochs):
    raise FinetuneError("set exactly one of config.unfreeze.every_steps and config.unfreeze.every_epochs")
  every = unfreeze_cfg.every_steps or max(1, round(unfreeze_cfg.every_epochs * steps_per_epoch))
  initial = unfreeze_cfg.initial_groups
  if not 1 <= initial <= len(order):
    raise FinetuneError(f"config.unfreeze.initial_groups={initial} must be in 1..{len(order)} (the trainable groups: "
                        f"{', '.join(order)})")
  if initial == len(order):  # (one phase: accepted, and nothing was ever unfrozen)
    raise FinetuneError(f"config.unfreeze.mode={unfreeze_cfg.mode!r} has nothing to unfreeze: "
                        f"config.unfreeze.initial_groups={initial} already trains every group that is not frozen "
                        f"({', '.join(order)}); lower initial_groups, freeze fewer groups, or set "
                        "config.unfreeze.mode='none'")
  top = order[len(order) - initial:]
  if unfreeze_cfg.mode == "gradual":
    trainable_sets = [order[len(order) - k:] for k in range(initial, len(order) + 1)]
  else:
    trainable_sets = [top] + [[g] for g in order[:len(order) - initial]] + [order]
  result = tuple(Phase(i * every, tuple(s)) for i, s in enumerate(trainable_sets))
  if result[-1].start >= total_steps:
    raise FinetuneError(f"config.unfreeze ({unfreeze_cfg.mode}, every {every} steps) needs more than "
                        f"{result[-1].start} steps to reach all {len(order)} groups but the stage has {total_steps}; "
                        "unfreeze more often or train longer")
  return result
