"""Optimizers and learning-rate schedules from config, as optax transformations.

`build_optimizer` returns the transformation and its schedule (so the train step can log the learning rate).
Optimizers and schedules are found by name in `OPTIMIZERS` / `SCHEDULES`; later methods (per-group learning
rates, freezing) wrap the returned transformation with `optax.multi_transform` rather than changing this file.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from ml_collections import ConfigDict

from finetune.partition import regex_mask
from finetune.registry import Registry

OPTIMIZERS: Registry[Callable[..., optax.GradientTransformation]] = Registry("optimizer")
SCHEDULES: Registry[Callable[[ConfigDict, int], optax.Schedule]] = Registry("learning-rate schedule")


@SCHEDULES.register("constant")
def constant_schedule(cfg: ConfigDict, total_steps: int) -> optax.Schedule:
  del total_steps
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1)), optax.constant_schedule(cfg.learning_rate)],
      [cfg.warmup_steps]) if cfg.warmup_steps else optax.constant_schedule(cfg.learning_rate)


@SCHEDULES.register("cosine")
def cosine_schedule(cfg: ConfigDict, total_steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if cfg.warmup_steps else cfg.learning_rate, peak_value=cfg.learning_rate,
      warmup_steps=cfg.warmup_steps, decay_steps=max(total_steps, cfg.warmup_steps + 1),
      end_value=cfg.learning_rate * cfg.end_learning_rate_factor)


@SCHEDULES.register("linear")
def linear_schedule(cfg: ConfigDict, total_steps: int) -> optax.Schedule:
  decay = optax.linear_schedule(cfg.learning_rate, cfg.learning_rate * cfg.end_learning_rate_factor,
                                max(total_steps - cfg.warmup_steps, 1))
  if not cfg.warmup_steps:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps), decay],
                              [cfg.warmup_steps])


@OPTIMIZERS.register("adamw")
def adamw(cfg: ConfigDict, learning_rate: optax.Schedule, decay_mask: Any) -> optax.GradientTransformation:
  return optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                     mask=decay_mask)


@OPTIMIZERS.register("sgd")
def sgd(cfg: ConfigDict, learning_rate: optax.Schedule, decay_mask: Any) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum; weight decay is coupled (added to the gradient), as in classic SGD papers."""
  parts = []
  if cfg.weight_decay:
    parts.append(optax.masked(optax.add_decayed_weights(cfg.weight_decay), decay_mask))
  parts.append(optax.sgd(learning_rate, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  return optax.chain(*parts)


def build_optimizer(cfg: ConfigDict, total_steps: int,
                    params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer for `params` (a pytree, abstract is fine) and its learning-rate schedule."""
  schedule = SCHEDULES.get(cfg.schedule)(cfg, total_steps)
  # Weight decay skips biases and norm scales (config.optimizer.no_decay); the mask is a static pytree of bools.
  no_decay = regex_mask(params, cfg.no_decay, "config.optimizer.no_decay", require_match=False)
  decay_mask = jax.tree.map(lambda excluded: not excluded, no_decay)
  transform = OPTIMIZERS.get(cfg.name)(cfg, schedule, decay_mask)
  if cfg.grad_clip_norm > 0:
    transform = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), transform)
  return transform, schedule

