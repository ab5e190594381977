"""Optimizers and learning-rate schedules from config, as optax transformations.

`build_optimizer` makes one optax partition entry per label of the stage's strategy (a layer group, or a group with
a regex multiplier), each the configured optimizer with that label's schedule, and `optax.set_to_zero` for the
'frozen' label (no optimizer state). Gradient clipping is global, before the partition. Optimizers and schedule
shapes are found by name in `OPTIMIZERS` / `SCHEDULES`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from finetune.partition import path_str
from finetune.registry import Registry

# A schedule shape: (config.optimizer, peak learning rate, number of steps) -> optax schedule over 0..steps.
ScheduleFactory = Callable[[ConfigDict, float, int], optax.Schedule]
# An optimizer: (config.optimizer, learning-rate schedule, weight-decay mask: params -> tree of bools) -> optax.
OPTIMIZERS: Registry[Callable[..., optax.GradientTransformation]] = Registry("optimizer")
SCHEDULES: Registry[ScheduleFactory] = Registry("learning-rate schedule")


# The config.optimizer keys that only some of the built-in schedules / optimizers read, and which read them: a key
# set where no stage's schedule or optimizer reads it is refused (config.validate), as it would be ignored.
SETTING_READERS = {
    "schedule": {"end_learning_rate_factor": ("cosine", "linear"), "cut_frac": ("stlr",), "ratio": ("stlr",),
                 "pct_start": ("onecycle",), "div_factor": ("onecycle",), "final_div_factor": ("onecycle",)},
    "name": {"b1": ("adamw",), "b2": ("adamw",), "eps": ("adamw",), "momentum": ("sgd",), "nesterov": ("sgd",)},
}


def _with_warmup(cfg: ConfigDict, peak: float, after: optax.Schedule) -> optax.Schedule:
  if not cfg.warmup_steps:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, cfg.warmup_steps), after], [cfg.warmup_steps])


@SCHEDULES.register("constant")
def constant_schedule(cfg: ConfigDict, peak: float, steps: int) -> optax.Schedule:
  del steps
  return _with_warmup(cfg, peak, optax.constant_schedule(peak))


@SCHEDULES.register("cosine")
def cosine_schedule(cfg: ConfigDict, peak: float, steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if cfg.warmup_steps else peak, peak_value=peak, warmup_steps=cfg.warmup_steps,
      decay_steps=max(steps, cfg.warmup_steps + 1), end_value=peak * cfg.end_learning_rate_factor)


@SCHEDULES.register("linear")
def linear_schedule(cfg: ConfigDict, peak: float, steps: int) -> optax.Schedule:
  decay = optax.linear_schedule(peak, peak * cfg.end_learning_rate_factor, max(steps - cfg.warmup_steps, 1))
  return _with_warmup(cfg, peak, decay)


@SCHEDULES.register("stlr")
def slanted_triangular(cfg: ConfigDict, peak: float, steps: int) -> optax.Schedule:
  """ULMFiT's slanted triangular learning rate (Howard & Ruder 2018, eq. 3), written out because optax has none.

  cut = floor(T * cut_frac); p = t / cut for t < cut, else 1 - (t - cut) / (cut * (1 / cut_frac - 1)), i.e.
  1 - (t - cut) / (T - cut);
  lr_t = peak * (1 + p * (ratio - 1)) / ratio.
  """
  cut = max(1, math.floor(steps * cfg.cut_frac))
  ratio = cfg.ratio
  # The paper's decay denominator cut * (1/cut_frac - 1) equals T - cut when T * cut_frac is whole; T - cut keeps
  # the schedule ending at its floor when it is not.
  decay_steps = max(steps - cut, 1)

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    p = jnp.where(t < cut, t / cut, 1.0 - (t - cut) / decay_steps)
    return peak * (1.0 + jnp.maximum(p, 0.0) * (ratio - 1.0)) / ratio

  return schedule


@SCHEDULES.register("onecycle")
def one_cycle(cfg: ConfigDict, peak: float, steps: int) -> optax.Schedule:
  return optax.cosine_onecycle_schedule(max(steps, 2), peak, pct_start=cfg.pct_start, div_factor=cfg.div_factor,
                                        final_div_factor=cfg.final_div_factor)


def decays(cfg: ConfigDict, path: str) -> bool:
  """Whether weight decay applies to the parameter at (unrolled) `path`: everywhere except parameters matching
  config.optimizer.no_decay (biases, norm scales)."""
  return not any(re.search(pattern, path) for pattern in cfg.no_decay)


def _decay_mask(cfg: ConfigDict, path_of: Callable[[str], str]) -> Callable[[Any], Any]:
  """`decays` as a mask over the optimizer's params. A function of the (partitioned) params so it works inside
  `optax.partition`, where other labels' leaves are masked out; `path_of` maps a scanned stack's segment path
  ('layers/0-3/...') to the layer path the regexes are written for ('layers/0/...'; segments never mix layers that
  decay with ones that do not, see scan.Layout.with_segments)."""
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda keypath, _: decays(cfg, path_of(path_str(keypath))), params)


@OPTIMIZERS.register("adamw")
def adamw(cfg: ConfigDict, learning_rate: optax.Schedule, decay_mask: Callable[[Any], Any]
          ) -> optax.GradientTransformation:
  return optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                     mask=decay_mask)


@OPTIMIZERS.register("sgd")
def sgd(cfg: ConfigDict, learning_rate: optax.Schedule, decay_mask: Callable[[Any], Any]
        ) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum; weight decay is coupled (added to the gradient), as in classic SGD papers."""
  parts = []
  if cfg.weight_decay:
    parts.append(optax.masked(optax.add_decayed_weights(cfg.weight_decay), decay_mask))
  parts.append(optax.sgd(learning_rate, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  return optax.chain(*parts)


# The schedules and optimizers registered above, which SETTING_READERS describes (tests/test_optim.py checks it
# against what each one reads); one registered elsewhere may read any key, so configs using it are not checked.
BUILT_IN = {"schedule": tuple(SCHEDULES.names()), "name": tuple(OPTIMIZERS.names())}


def label_schedule(cfg: ConfigDict, peak: float, start: int, total_steps: int, mode: str,
                   phase: tuple[int, int] | None = None) -> Callable[[Any], Any]:
  """The learning rate of a label that starts training at global step `start`, as a function of the global step,
  in the phase that spans steps [phase[0], phase[1]) (default: the whole stage).

  'continue': the stage's schedule, read at the global step. 'restart': the schedule shape over the remaining
  `total_steps - start` steps, from the label's first step. 'cycle': the schedule shape over each phase, for every
  label training in it (fastai's ULMFiT practice: `freeze_to(-k)` then `fit_one_cycle` per unfreezing step, so
  each group that joins warms up, and every group sees the peak rate again).
  """
  factory = SCHEDULES.get(cfg.schedule)
  first, end = phase or (0, total_steps)
  if mode == "cycle" and (first, end) != (0, total_steps):
    inner = factory(cfg, peak, end - first)
    return lambda step: inner(step - first)
  if mode == "restart" and start:
    inner = factory(cfg, peak, total_steps - start)
    return lambda step: inner(step - start)
  return factory(cfg, peak, total_steps)


def build_optimizer(cfg: ConfigDict, strategy, phase: int, total_steps: int, params: Any,
                    path_of: Callable[[str], str] = lambda path: path, lr_scale: Any = None,
                    ) -> tuple[optax.GradientTransformation, dict[str, Callable[[Any], Any]]]:
  """The optimizer for `phase` of `strategy`, and {label: learning rate as a function of the global step} (0 for
  labels resting in this phase).

  Each label's optax state counts its own updates from 0 (the step from which it has trained without a break), so
  its schedule is the global-step schedule shifted by that start.
  `lr_scale` (a scalar, possibly traced) multiplies every label's learning rate: `finetune.vmap` trains points
  that differ in `optimizer.learning_rate` with one optimizer and a per-point scale, which is exact because every
  schedule shape is linear in its peak (tests/test_optim.py checks each registered one).
  """
  base = OPTIMIZERS.get(cfg.name)
  decay_mask = _decay_mask(cfg, path_of)
  trainable_labels = {strategy.label(p) for p in strategy.trainable(phase)}
  bounds = strategy.phase_span(phase, total_steps)
  lr_by_label = {}
  transforms: dict[str, optax.GradientTransformation] = {"frozen": optax.set_to_zero()}
  for label, peak in strategy.labels().items():
    if label not in trainable_labels:
      lr_by_label[label] = lambda step: jnp.zeros((), jnp.float32)  # resting in this phase
      continue
    start = strategy.label_start(label, phase)
    global_lr = label_schedule(cfg, peak, start, total_steps, strategy.schedule_mode, bounds)
    if lr_scale is not None:
      global_lr = lambda step, unscaled=global_lr: lr_scale * unscaled(step)
    lr_by_label[label] = global_lr
    transforms[label] = base(cfg, lambda count, fn=global_lr, offset=start: fn(count + offset), decay_mask)
  partitioned = optax.partition(transforms, strategy.labels_tree(params, phase, path_of))
  clip = optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm > 0 else optax.identity()
  return optax.chain(clip, partitioned), lr_by_label


def carry_over(old_state: Any, new_state: Any) -> Any:
  """At an unfreezing boundary: the new phase's optimizer state, keeping the old state of every label that was
  already training (its subtree has the same structure: a label's parameters never change)."""
  clip_state, old_partition = old_state
  _, new_partition = new_state
  inner = dict(new_partition.inner_states)
  for label, state in old_partition.inner_states.items():
    if label != "frozen" and label in inner:
      inner[label] = state
  return (clip_state, new_partition._replace(inner_states=inner))
