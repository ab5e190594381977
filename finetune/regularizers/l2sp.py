"""L2-SP (Li, Grandvalet & Davoine 2018): keep fine-tuned weights near their starting point, not near zero.

    (alpha/2) ||w_S - w0_S||^2 + (beta/2) ||w_new||^2

w_S are the parameters loaded from the source (same path and shape, not re-initialised), w0_S their source values
(with an adapter loaded by `config.peft.load_adapter` folded in: the stage's starting point);
w_new every other parameter of the model (a new head) that weight decay would reach: biases and norm scales
(`config.optimizer.no_decay`) are exempt, as a re-initialised LayerNorm or BatchNorm scale starts at 1 and pulling it
towards 0 would shrink every feature it normalises (the paper's beta stands in for the weight decay of the new
layers). Parameters a PEFT method adds are w_S when the stage loads them (it continues a run with the same PEFT
settings), else in neither: DoRA magnitudes start at ||W|| and IA3 scales at 1, so pulling them towards 0 would
shrink the pretrained function.
With `fisher=True` the first term is weighted by the source task's diagonal Fisher (as EWC, with
`config.regularize.ewc`'s label mode and example count), the paper's "L2-SP-Fisher". Use it with plain weight
decay off (`optimizer.weight_decay=0`), as the paper replaces it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from finetune import optim
from finetune.errors import FinetuneError
from finetune.regularizers import REGULARIZERS, Aux, Context, Regularizer, squared_distance


def new_parameters(context: Context) -> list[str]:
  """The paths beta pulls towards 0: not loaded from the source, not a PEFT method's own, and not exempt from
  weight decay (config.optimizer.no_decay: biases, norm scales)."""
  shared = set(context.shared(context.nearest("L2-SP")))
  return [p for p in context.shapes if p not in shared and p not in context.peft_added
          and optim.decays(context.cfg.optimizer, p)]


def anchors(context: Context):
  cfg = context.cfg.regularize.l2sp
  source = context.nearest("L2-SP")
  shared = context.shared(source)
  # An adapter loaded onto the source's weights (config.peft.load_adapter) is part of the starting point, as it is
  # when the stage starts from that adapter's run (whose adapters the lineage folds in).
  start = context.effective_start() if context.cfg.peft.load_adapter else source.params
  anchor = {"alpha": float(cfg.alpha), "beta": float(cfg.beta), "start": {p: start[p] for p in shared},
            # (a dict of the paths, as anchors are pytrees of arrays that go into the train state)
            "new": {p: np.zeros((), np.float32) for p in new_parameters(context)}}
  if cfg.fisher:
    if source.cfg is None:
      raise FinetuneError(f"config.regularize.l2sp.fisher needs the earlier task's data to estimate its Fisher "
                          f"information, but {source.name} is a checkpoint without a task config; initialise from a "
                          "stage or run of this framework, or set fisher=False")
    fisher = context.fisher(source)
    anchor["fisher"] = {p: fisher[p] for p in shared}
  return anchor


def penalty(params, anchor, aux: Aux):
  del aux
  toward_start = squared_distance(params, anchor["start"], anchor.get("fisher"))
  new = jnp.zeros((), jnp.float32)
  for path in anchor["new"]:
    new = new + jnp.sum(params[path].astype(jnp.float32) ** 2)
  return 0.5 * anchor["alpha"] * toward_start + 0.5 * anchor["beta"] * new, {"distance": toward_start}


REGULARIZERS.register("l2sp")(Regularizer(
    active=lambda cfg: cfg.regularize.l2sp.alpha > 0 or cfg.regularize.l2sp.beta > 0, anchors=anchors,
    penalty=penalty))
