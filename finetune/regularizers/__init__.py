"""Forgetting regularizers: loss terms that keep a fine-tuned model close to what it was trained for before.

One file per regularizer, registered by name in `REGULARIZERS` and configured under `config.regularize.<name>`
(active when its weight is > 0): `ewc` (Kirkpatrick et al. 2017; offline or online), `l2sp` (Li et al. 2018;
optionally Fisher-weighted), `lwf` (Learning without Forgetting, Li & Hoiem 2016), `rehearsal` (the loss on
source-task examples mixed into target batches by `config.rehearsal`).

A regularizer has two halves:
* `anchors(context) -> {name: pytree of arrays}`, on the host at the start of a stage: what it must remember of
  the earlier tasks (their weights, Fisher information, head). Anchors ride in `TrainState.anchors`, so the jitted
  step receives them as arguments (never closed over), sharded like the parameters; they are not checkpointed but
  rebuilt from the source stages (and the saved Fisher) on resumption, identically.
* `penalty(params, anchors, aux) -> (value, metrics)`, inside the train step, over the '/'-joined flat parameters.

The earlier tasks are the stage's *lineage*: the chain of `init_from` links (`stage:NAME` or a run directory with
its config.json), nearest first. A penalty covers only parameters that exist in both stages with the same shape and
that the stage did not re-initialise (`dont_load`, e.g. a new head).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from finetune.checkpoint import read_checkpoint_arrays, resolve_checkpoint
from finetune.errors import FinetuneError
from finetune.models import hf
from finetune.registry import Registry
from finetune.reporting import read_json


@dataclasses.dataclass(frozen=True)
class Source:
  """An earlier task in the lineage: its final weights and, when it was trained by this framework, its config."""

  name: str
  run_dir: str
  cfg: ConfigDict | None  # None for a Hugging Face checkpoint (weights, no task data)
  params: dict[str, np.ndarray]  # a PEFT source's adapters folded in whenever its method can be
  model_state: dict[str, np.ndarray]
  step: str | None = None  # the checkpoint step folder read (None for a Hugging Face checkpoint)
  # dont_load patterns of the stages between this source and the current one: what they re-initialised (a new
  # head, say) is no longer this task's, even where the current stage loads it from its own source.
  reinitialised_after: tuple[str, ...] = ()
  folded: bool = False  # its PEFT adapters were folded in: `params` are the plain model's

  def carried(self, path: str) -> bool:
    """Whether `path` still holds this task's weights in the stage's source (no later stage re-initialised it)."""
    return not any(re.search(pattern, path) for pattern in self.reinitialised_after)


@dataclasses.dataclass
class Context:
  """What `anchors` may read: the stage, its starting weights and its lineage."""

  cfg: ConfigDict
  shapes: dict[str, tuple[int, ...]]  # current parameters
  reinitialised: frozenset[str]  # paths the stage did not load from its source (dont_load, new adapters)
  sources: list[Source]
  fisher: Callable[[Source], dict[str, np.ndarray]]  # the diagonal Fisher of a source (computed once, saved)
  start: dict[str, np.ndarray]  # the stage's initial parameters (after init_from), flat
  start_state: dict[str, np.ndarray]  # and model state (BatchNorm statistics)
  peft_added: frozenset[str] = frozenset()  # parameters a PEFT method added (adapters, DoRA magnitudes, IA3 scales)
  # The stage's PEFT method's map from parameters to the weights its layers compute with (None: the parameters)
  effective: Callable[[dict], dict] | None = None

  def effective_start(self) -> dict[str, np.ndarray]:
    """The weights the stage's layers start computing with (`start` with its adapters folded in), flat."""
    if self.effective is None:
      return self.start
    return {p: np.asarray(v) for p, v in self.effective(self.start).items()}

  def shared(self, source: Source) -> list[str]:
    """Paths present in the stage and in `source` with equal shapes, and loaded (not re-initialised)."""
    return [p for p, shape in self.shapes.items() if p not in self.reinitialised and p in source.params
            and tuple(source.params[p].shape) == tuple(shape) and source.carried(p)]

  def nearest(self, what: str) -> Source:
    if not self.sources:
      raise FinetuneError(f"{what} needs an earlier task: set config.init_from to a stage ('stage:NAME') or a run "
                          "directory of this framework")
    return self.sources[0]


def source_rows(batch: dict[str, jax.Array]) -> jax.Array:
  """(B,): 1.0 for a batch's rehearsed source rows (`source_mask`), 0.0 for the stage's own."""
  if "source_mask" in batch:
    return batch["source_mask"].astype(jnp.float32)
  return jnp.zeros(next(iter(batch.values())).shape[0], jnp.float32)


@dataclasses.dataclass(frozen=True)
class Aux:
  """Inputs a penalty may use besides the parameters."""

  batch: dict[str, jax.Array]
  features: jax.Array | None  # the model's features (its head's input) when a regularizer asked for them
  # (flat params, flat model state) -> features of this batch from the same model with those weights, inference mode
  embed_with: Callable[[dict, dict], jax.Array] | None = None
  # Gradient accumulation: the whole batch's row counts ({'source', 'target'}, `step.row_totals`) and the number of
  # micro-batches; `batch` is then one micro-batch.
  totals: dict[str, jax.Array] | None = None
  micro_batches: int = 1

  def rows(self, kind: str) -> jax.Array:
    """1.0 for the batch's 'target' rows (the stage's own task) or its 'source' rows (rehearsed), else 0.0."""
    source = source_rows(self.batch)
    return 1.0 - source if kind == "target" else source

  def mean_over(self, values: jax.Array, kind: str) -> jax.Array:
    """The mean of per-row `values` over the 'target' or 'source' rows. On a micro-batch: its share of the whole
    batch's mean (times the number of micro-batches), so the mean over micro-batches is the whole batch's."""
    rows = self.rows(kind)
    total = rows.sum() if self.totals is None else self.totals[kind]
    return self.micro_batches * jnp.sum(values * rows) / jnp.maximum(total, 1.0)


@dataclasses.dataclass(frozen=True)
class Regularizer:
  active: Callable[[ConfigDict], bool]  # from config.regularize.<name> (and config.rehearsal)
  anchors: Callable[[Context], Any]
  penalty: Callable[[dict[str, jax.Array], Any, Aux], tuple[jax.Array, dict[str, jax.Array]]]
  needs_features: bool = False


REGULARIZERS: Registry[Regularizer] = Registry("regularizer")


def active(cfg: ConfigDict) -> list[str]:
  return [name for name in REGULARIZERS.names() if REGULARIZERS.get(name).active(cfg)]


def needs_features(cfg: ConfigDict) -> bool:
  return any(REGULARIZERS.get(name).needs_features for name in active(cfg))


def lineage(cfg: ConfigDict, workdir: str, hf_weights: bool = True) -> list[Source]:
  """The earlier tasks of a stage, nearest first: follow `init_from` through stages of this run and run
  directories of this framework (their config.json), ending at a Hugging Face checkpoint or a fresh start.
  `hf_weights=False` leaves a Hugging Face checkpoint out (no task to evaluate; its weights may be large).
  A source's own `stage:NAME` link is resolved in the workdir that source ran in, which may not be this one."""
  from finetune import adapters  # pylint: disable=g-import-not-at-top  (adapters imports the model registry)
  sources, seen, current, reinitialised_after = [], set(), cfg, ()
  while current is not None and current.get("init_from"):
    spec = current.init_from
    step_dir = resolve_checkpoint(spec, workdir)
    if step_dir in seen:
      break
    seen.add(step_dir)
    if hf.is_hf_checkpoint(step_dir):
      if not hf_weights:
        break
      arrays, run_dir, source_cfg, step = hf.read_params(step_dir), step_dir, None, None
    else:
      # The weights the source's layers computed with: a PEFT source's adapters folded in (whenever its method can
      # be), as the stage's own are in the penalty (`make_penalty`'s `effective`).
      stored = read_checkpoint_arrays(step_dir)
      arrays = adapters.fold_source_adapters(step_dir, stored, cfg.peft, whenever_possible=True)
      run_dir = os.path.dirname(os.path.dirname(step_dir))  # <run>/checkpoints/<step>
      config_path = os.path.join(run_dir, "config.json")
      source_cfg = ConfigDict(read_json(config_path)) if os.path.isfile(config_path) else None
      step = os.path.basename(step_dir)
      workdir = os.path.dirname(run_dir)  # a stage's folder is <its workdir>/<stage name>
    if current is not cfg:  # what the stages in between re-initialised (the stage's own is Context.reinitialised)
      reinitialised_after += tuple(current.get("dont_load", ()))
    name = spec[len("stage:"):] if spec.startswith("stage:") else spec
    sources.append(Source(name, run_dir, source_cfg, dict(arrays["params"]), dict(arrays.get("model_state", {})),
                          step, reinitialised_after, folded=source_cfg is not None and arrays is not stored))
    current = source_cfg
  return sources


def build_anchors(context: Context) -> dict[str, Any]:
  anchors = {}
  for name in active(context.cfg):
    value = REGULARIZERS.get(name).anchors(context)
    anchors[name] = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) if np.issubdtype(np.asarray(x).dtype,
                                                                                          np.floating) else x, value)
  return anchors


def make_penalty(cfg: ConfigDict, effective: Callable[[dict], dict] | None = None
                 ) -> Callable[[dict, dict, Aux], tuple[jax.Array, dict]] | None:
  """The sum of the active regularizers' penalties, or None when none is active. `effective` (a PEFT stage's,
  `adapters.effective_weights`) maps the parameters to the weights the adapted layers compute with, which is what
  the penalties see: EWC and L2-SP then pull W + s A B towards the source's weights through A and B (the frozen W
  alone would give them nothing to act on)."""
  names = active(cfg)
  if not names:
    return None

  def penalty(params: dict[str, jax.Array], anchors: dict[str, Any], aux: Aux):
    total, metrics = jnp.zeros((), jnp.float32), {}
    params = effective(params) if effective is not None else params
    for name in names:
      value, extra = REGULARIZERS.get(name).penalty(params, anchors[name], aux)
      total = total + value
      metrics[f"penalty/{name}"] = value
      metrics.update({f"{name}/{k}": v for k, v in extra.items()})
    return total, metrics

  return penalty


def squared_distance(params: dict[str, jax.Array], anchor: dict[str, jax.Array],
                     weights: dict[str, jax.Array] | None = None) -> jax.Array:
  """sum_i w_i (theta_i - anchor_i)^2 over the anchor's paths (w = 1 without weights)."""
  total = jnp.zeros((), jnp.float32)
  for path, value in anchor.items():
    difference = (params[path].astype(jnp.float32) - value) ** 2
    total = total + jnp.sum(difference * weights[path] if weights is not None else difference)
  return total


# Importing a regularizer module registers it.
from finetune.regularizers import ewc  # noqa: E402,F401
from finetune.regularizers import l2sp  # noqa: E402,F401
from finetune.regularizers import lwf  # noqa: E402,F401
from finetune.regularizers import rehearsal  # noqa: E402,F401
