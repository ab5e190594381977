"""The pure functional core: train state, train step and eval step.

`train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch) -> sums` are pure functions of
pytrees. The model's graph definition and the optimizer are static (captured when the step is built); every array
is an argument, so nothing large is constant-folded into the compiled program. `compile_steps` jits them with
explicit shardings and donates the train state.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from finetune.sharding import batch_sharding, replicated


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training. Parameters and model collections are nested dicts of arrays."""

  step: jax.Array  # int32 scalar: number of updates applied so far
  params: Any  # trainable model parameters (nnx.Param), pure dict
  model_state: Any  # other model collections (BatchNorm statistics), pure dict
  opt_state: optax.OptState
  rng: jax.Array  # uint32[2] key; the key of step s is fold_in(rng, s), so resumption reproduces it

  def as_dict(self) -> dict[str, Any]:
    return {"step": self.step, "params": self.params, "model_state": self.model_state,
            "opt_state": self.opt_state, "rng": self.rng}


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels (optionally smoothed)."""
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing) if label_smoothing else \
      jax.nn.one_hot(labels, num_classes)
  return optax.softmax_cross_entropy(logits, targets)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    label_smoothing: float = 0.0) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Builds `train_step(state, batch) -> (state, metrics)` for batches {'image': (B, ...), 'label': (B,)}."""

  def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    dropout_key = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.model_state)
      logits = model(batch["image"], train=True, rngs=nnx.Rngs(dropout=dropout_key))
      loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
      _, _, new_model_state = nnx.split(model, nnx.Param, ...)
      return loss, (logits, new_model_state.to_pure_dict())

    (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "grad_norm": optax.global_norm(grads),
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
    }
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, label_smoothing: float = 0.0) -> Callable[[TrainState, dict], dict]:
  """Builds `eval_step(state, batch) -> sums` over a padded batch with a 0/1 'mask' (padding never counts)."""

  def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    model = nnx.merge(graphdef, state.params, state.model_state)
    logits = model(batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    loss = cross_entropy(logits, batch["label"], label_smoothing)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}

  return eval_step


def compile_steps(train_step, eval_step, abstract_state: TrainState, train_batch: dict, eval_batch: dict,
                  mesh: Mesh):
  """Compiles both steps ahead of time for the given abstract inputs (ShapeDtypeStructs with shardings).

  Shardings are explicit: state as given, batches over the data-parallel axes, metrics replicated. The train state
  is donated (updated in place). Compiling ahead of time keeps compilation out of every timing and gives the
  planner `memory_analysis()` / `cost_analysis()` of exactly the program that runs.
  """
  batch = batch_sharding(mesh)
  scalar: NamedSharding = replicated(mesh)
  state_shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract_state)
  train = jax.jit(train_step, in_shardings=(state_shardings, batch), out_shardings=(state_shardings, scalar),
                  donate_argnums=(0,))
  evaluate = jax.jit(eval_step, in_shardings=(state_shardings, batch), out_shardings=scalar)
  return (train.lower(abstract_state, train_batch).compile(),
          evaluate.lower(abstract_state, eval_batch).compile())
