"""Elastic weight consolidation (Kirkpatrick et al. 2017): (lambda/2) sum_i F_i (theta_i - theta*_i)^2.

F is the diagonal Fisher information of an earlier task at its final weights theta* (`fisher.py`: per-example
gradients, squared, then averaged; `label_mode` true / empirical / expected), computed once from `num_examples`
training examples of that task and saved next to its checkpoints
(`<source run>/fisher-<mode>-<N>-at-<step>.safetensors`).

* Offline (default): one term per earlier task of the lineage, each with its own F and theta*.
* Online (`online=True`, Schwarz et al. 2018): one term with the running Fisher F~ = gamma F~_older + F_nearest and
  the nearest task's weights.
Only parameters present in both stages (same path and shape, not re-initialised) are penalised.
"""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict

from finetune.errors import FinetuneError
from finetune.regularizers import REGULARIZERS, Aux, Context, Regularizer, squared_distance


def _tasks(context: Context):
  with_data = [s for s in context.sources if s.cfg is not None]
  if not context.sources or context.sources[0].cfg is None:
    context.nearest("EWC")
    raise FinetuneError(f"EWC needs the earlier task's data to estimate its Fisher information, but "
                        f"{context.sources[0].name} is a checkpoint without a task config; initialise from a stage "
                        "or run of this framework, or use config.regularize.l2sp")
  return with_data


def anchors(context: Context) -> dict[str, Any]:
  cfg: ConfigDict = context.cfg.regularize.ewc
  tasks = _tasks(context)
  if cfg.online:
    nearest, fishers = tasks[0], [context.fisher(source) for source in tasks]
    shared = [p for p in context.shared(nearest) if p in fishers[0]]
    running: dict = {}
    for source, fisher in reversed(list(zip(tasks, fishers))):  # oldest first: F~ <- gamma F~ + F_task
      # An older task contributes only where its weights were carried forward (not where a later stage put a new
      # head, say, which may also have another shape).
      own = set(context.shared(source))
      running = {p: cfg.gamma * running.get(p, 0.0) + (fisher[p] if p in own and p in fisher else 0.0)
                 for p in shared}
    terms = [{"theta": {p: nearest.params[p] for p in running}, "fisher": running}]
  else:
    terms = []
    for source in tasks:
      fisher = context.fisher(source)
      shared = [p for p in context.shared(source) if p in fisher]
      terms.append({"theta": {p: source.params[p] for p in shared}, "fisher": {p: fisher[p] for p in shared}})
  return {"weight": float(cfg.weight), "terms": terms}


def penalty(params, anchor, aux: Aux):
  del aux
  value = sum(squared_distance(params, term["theta"], term["fisher"]) for term in anchor["terms"])
  return 0.5 * anchor["weight"] * value, {}


REGULARIZERS.register("ewc")(Regularizer(active=lambda cfg: cfg.regularize.ewc.weight > 0, anchors=anchors,
                                         penalty=penalty))
