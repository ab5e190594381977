"""Rehearsal (experience replay): source-task examples mixed into target batches (`config.rehearsal.fraction` of
each batch, drawn by `finetune.data.pipeline.RehearsalPipeline` and marked by `batch['source_mask']`).

Their loss is the cross-entropy of the source task's head (frozen, from the source checkpoint) on the current
features: the backbone must keep serving the old task. The target loss covers the other examples only, so the step's
loss is mean(target rows) + weight * mean(source rows): the fraction sets how many rows each mean averages, the
weight how much the source task counts (weight = f / (1 - f) is experience replay's average over the mixed batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from finetune.regularizers import REGULARIZERS, Aux, Context, Regularizer
from finetune.regularizers.lwf import source_head


def anchors(context: Context):
  return {"weight": float(context.cfg.rehearsal.weight), "head": source_head(context, "rehearsal")}


def penalty(params, anchor, aux: Aux):
  del params
  head = anchor["head"]
  logits = aux.features @ head["kernel"] + head["bias"]
  # Target rows carry target-task labels, which may exceed the source head's classes: the lookup of such a label
  # gives NaN (jnp.take_along_axis fills out-of-range indices), and NaN * 0 row weight is NaN. Their loss is unused,
  # so they look up class 0.
  labels = jnp.where(aux.rows("source") > 0, aux.batch["label"], 0)
  losses = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  loss = aux.mean_over(losses, "source")
  return anchor["weight"] * loss, {"loss": loss, "accuracy": aux.mean_over(correct, "source")}


REGULARIZERS.register("rehearsal")(Regularizer(active=lambda cfg: cfg.rehearsal.fraction > 0, anchors=anchors,
                                               penalty=penalty, needs_features=True))
