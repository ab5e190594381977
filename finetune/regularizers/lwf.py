"""Learning without Forgetting (Li & Hoiem 2016): distil the source model's outputs on the *target* inputs.

The source model is the stage's starting point (the source backbone, with any new parameters at their initial
values, e.g. LoRA's B = 0) and the source task's head, both frozen. Each step it scores the batch (no gradient),
and the current backbone's features through the same source head are pulled towards those soft targets:

    weight * T^2 * KL(softmax(z_source / T) || softmax(z_current / T))

with temperature T (the paper: T = 2) and the T^2 of Hinton et al. so the gradient scale does not depend on T.
The paper also fine-tunes the old head; here it stays frozen, so the source task is later evaluated with exactly
the head the penalty protected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from finetune.errors import FinetuneError
from finetune.regularizers import REGULARIZERS, Aux, Context, Regularizer


def source_head(context: Context, what: str) -> dict:
  source = context.nearest(what)
  if "head/kernel" not in source.params:
    raise FinetuneError(f"{what} needs the source task's classifier (head/kernel) in {source.name}")
  return {"kernel": source.params["head/kernel"], "bias": source.params.get(
      "head/bias", jax.numpy.zeros(source.params["head/kernel"].shape[1]))}


def anchors(context: Context):
  return {"weight": float(context.cfg.regularize.lwf.weight),
          "temperature": float(context.cfg.regularize.lwf.temperature),
          "head": source_head(context, "LwF"), "start": context.start, "start_state": context.start_state}


def penalty(params, anchor, aux: Aux):
  del params
  head = anchor["head"]
  source_features = jax.lax.stop_gradient(aux.embed_with(anchor["start"], anchor["start_state"]))
  temperature = anchor["temperature"]
  targets = jax.nn.softmax((source_features @ head["kernel"] + head["bias"]) / temperature, axis=-1)
  log_current = jax.nn.log_softmax((aux.features @ head["kernel"] + head["bias"]) / temperature, axis=-1)
  kl = jnp.sum(targets * (jnp.log(jnp.clip(targets, 1e-12)) - log_current), axis=-1)  # (B,)
  distillation = aux.mean_over(kl, "target")
  return anchor["weight"] * temperature ** 2 * distillation, {"kl": distillation}


REGULARIZERS.register("lwf")(Regularizer(active=lambda cfg: cfg.regularize.lwf.weight > 0, anchors=anchors,
                                         penalty=penalty, needs_features=True))
