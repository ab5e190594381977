"""The pure functional core: train state, train step and eval step.

`train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch) -> sums` are pure functions of
pytrees. The model's graph definition and the optimizer are static (captured when the step is built); every array
is an argument, so nothing large is constant-folded into the compiled program. `compile_*_step` jit them with
explicit shardings and donates the train state.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from finetune import adapters
from finetune.methods import prompt_tuning
from finetune.partition import combine, flatten, map_with_path, path_str, select
from finetune.regularizers import Aux, source_rows
from finetune.scan import Layout
from finetune.sharding import batch_sharding, replicated
from finetune.tasks import TASKS


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training. Parameters and model collections are nested dicts of arrays."""

  step: jax.Array  # int32 scalar: number of updates applied so far
  params: Any  # trainable model parameters (nnx.Param), pure dict
  model_state: Any  # other model collections (BatchNorm statistics), pure dict
  opt_state: optax.OptState
  rng: jax.Array  # uint32[2] key; the key of step s is fold_in(rng, s), so resumption reproduces it
  # Constants of the forgetting regularizers (earlier tasks' weights, Fisher, heads; finetune/regularizers), passed
  # into the step as arguments. Never updated and not checkpointed: rebuilt from the source stages on resumption.
  anchors: Any = None

  def as_dict(self) -> dict[str, Any]:
    """What a checkpoint holds (everything but the anchors)."""
    return {"step": self.step, "params": self.params, "model_state": self.model_state,
            "opt_state": self.opt_state, "rng": self.rng}


def inference_mode_batch_norm(model: nnx.Module, module_paths: tuple[str, ...]) -> None:
  """Puts the BatchNorm modules at `module_paths` in inference mode (frozen: statistics used, never updated)."""
  if not module_paths:
    return
  wanted = set(module_paths)
  for keypath, node in nnx.iter_graph(model):
    if isinstance(node, nnx.BatchNorm) and path_str(keypath) in wanted:
      node.use_running_average = True


def model_inputs(model: nnx.Module, batch: dict[str, jax.Array]) -> list[jax.Array]:
  """The batch entries the model takes, in order: `model.input_keys` (image models: ('image',))."""
  return [batch[key] for key in getattr(model, "input_keys", ("image",))]


def classify(model: nnx.Module, batch: dict[str, jax.Array], *, train: bool = False,
             rngs: nnx.Rngs | None = None) -> jax.Array:
  """The default forward pass: the whole model on its inputs. (Cached feature extraction swaps in the head.)"""
  inputs, virtual = prompt_tuning.prompted_inputs(model, model_inputs(model, batch))
  with adapters.call_context(model, train, rngs):
    outputs = model(*inputs, train=train, rngs=rngs)
  # A prompt-tuned language model predicts after the virtual tokens too: keep the real positions' outputs.
  return outputs[:, virtual:] if virtual and outputs.ndim == 3 else outputs


def classify_with_features(model: nnx.Module, batch: dict[str, jax.Array], *, train: bool = False,
                           rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
  """(logits, features): the model as `head(embed(x))`, for regularizers that also score the features with
  another task's head (LwF, rehearsal). Classifiers only."""
  inputs, _ = prompt_tuning.prompted_inputs(model, model_inputs(model, batch))
  with adapters.call_context(model, train, rngs):
    features = model.embed(*inputs, train=train, rngs=rngs)
    return model.head(features).astype(jnp.float32), features


def embed_fn(graphdef: nnx.GraphDef, template: Any, batch: dict[str, jax.Array], layout: Layout = Layout()):
  """(flat params, flat model state) -> features of `batch` in inference mode, for a model of `graphdef`. The flat
  dicts use unrolled paths (as penalties and anchors do); `template` is in the stored `layout` (scanned layers)."""
  def embed(params: dict[str, jax.Array], model_state: dict[str, jax.Array]) -> jax.Array:
    params_tree = layout.unview(map_with_path(lambda path, _: params[path], layout.view(template["params"])))
    state_tree = layout.unview(map_with_path(lambda path, _: model_state[path], layout.view(template["model_state"])))
    model = nnx.merge(graphdef, params_tree, state_tree)
    inputs, _ = prompt_tuning.prompted_inputs(model, model_inputs(model, batch))
    return model.embed(*inputs, train=False)
  return embed


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr_by_label: dict[str, Callable[[Any], Any]], trainable: frozenset[str],
                    frozen_batch_norm: tuple[str, ...] = (), label_smoothing: float = 0.0,
                    forward: Callable[..., jax.Array] = classify, task: str = "classification",
                    penalty: Callable | None = None, needs_features: bool = False, accumulate: int = 1,
                    compute_dtype: str = "float32", layout: Layout = Layout(), keep_float32: tuple[str, ...] = (),
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Builds `train_step(state, batch) -> (state, metrics)` for batches of model inputs (e.g. {'image': (B, ...)}
  or {'input_ids': (B, L), 'attention_mask': (B, L)}) and 'label': (B,).

  Only the parameters in `trainable` are differentiated: the frozen ones enter the loss as constants, so autodiff
  does no backward pass through layers that lead only to frozen parameters. They receive no update and the
  optimizer keeps no state for them ('frozen' partition entry).

  `penalty(flat params, state.anchors, regularizers.Aux) -> (value, metrics)` adds the forgetting regularizers'
  terms (finetune/regularizers); with `needs_features` the forward pass also returns the head's input. Examples with
  batch['source_mask'] = 1 (rehearsal) are left out of the task loss; the rehearsal regularizer scores them.
  `accumulate` > 1 splits each batch into that many micro-batches (gradient accumulation).
  `compute_dtype='bfloat16'`: mixed precision. The forward and backward passes run on bfloat16 copies of the
  parameters and float inputs; the parameters themselves (the master weights), their gradients, the optimizer state,
  BatchNorm statistics, logits and the loss stay float32, and so do the parameters whose paths match a regex in
  `keep_float32` (e.g. norms, embeddings) in the forward pass too.
  Scanned layers (`layout`): `trainable` and the penalty are written over the unrolled view of the parameters, the
  optimizer over its segments (finetune/scan.py). A stacked parameter is differentiated when any of its layers
  trains; its gradient is sliced into segments, so a frozen segment reaches only the optimizer's 'frozen' entry.
  """
  stored_trainable = layout.stored_paths(trainable)
  is_trainable = lambda path: path in stored_trainable
  score = TASKS.get(task).score

  def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    dropout_key = jax.random.fold_in(state.rng, state.step)
    trainable_params = select(state.params, is_trainable)
    frozen_params = select(state.params, lambda path: not is_trainable(path))

    def loss_fn(trainable_params, batch, model_state, dropout_key, totals=None):
      """`totals`: the whole batch's row_totals when `batch` is one of `accumulate` micro-batches. Its means are
      then taken over the whole batch's items (times `accumulate`), so the mean over micro-batches is exactly the
      whole batch's loss however unevenly padding, loss masks or rehearsed rows fall into them."""
      params = combine(state.params, trainable_params, frozen_params)
      model = nnx.merge(graphdef, to_compute_dtype(params, compute_dtype, keep_float32), model_state)
      batch = to_compute_dtype(batch, compute_dtype)
      inference_mode_batch_norm(model, frozen_batch_norm)
      rngs = nnx.Rngs(dropout=dropout_key)
      if needs_features:
        logits, features = classify_with_features(model, batch, train=True, rngs=rngs)
      else:
        logits, features = forward(model, batch, train=True, rngs=rngs), None
      scored = score(logits, batch, label_smoothing)
      weights = task_weights(scored.weights, batch)
      share = accumulate if totals is not None else 1
      total_weight = jnp.maximum(weights.sum() if totals is None else totals["task"], 1.0)
      task_loss = share * (scored.losses * weights).sum() / total_weight
      accuracy = share * (scored.correct * weights).sum() / total_weight
      _, _, new_model_state = nnx.split(model, nnx.Param, ...)
      extra = {}
      loss = task_loss
      if penalty is not None:
        template = {"params": state.params, "model_state": model_state}
        value, extra = penalty(flatten(layout.view(params)), state.anchors,
                               Aux(batch, features, embed_fn(graphdef, template, batch, layout), totals, share))
        loss = task_loss + value
        extra = {"task_loss": task_loss, **extra}
      return loss, (accuracy, new_model_state.to_pure_dict(), extra)

    gradient = jax.value_and_grad(loss_fn, has_aux=True)
    if accumulate == 1:
      (loss, (accuracy, model_state, extra)), grads = gradient(trainable_params, batch, state.model_state,
                                                               dropout_key)
    else:
      # Gradient accumulation: the batch as `accumulate` micro-batches, one after another inside this program
      # (lax.scan), so activation memory is that of one micro-batch. Micro-batch i is rows i, i + k, ...: each
      # data-parallel device holds its share of every micro-batch (contiguous rows would sit on a few devices and
      # be gathered). Means are over the whole batch's items (`row_totals`), so losses and gradients equal the
      # whole batch's; BatchNorm statistics update per micro-batch.
      totals = row_totals(batch, TASKS.get(task).weights(batch))
      micro = jax.tree.map(  # (B, ...) -> (B/k, k, ...) -> (k, B/k, ...): micro-batch i = rows i::k
          lambda x: x.reshape(x.shape[0] // accumulate, accumulate, *x.shape[1:]).swapaxes(0, 1), batch)

      def one(carry, inputs):
        grads_sum, model_state = carry
        index, micro_batch = inputs
        (loss, (accuracy, model_state, extra)), grads = gradient(
            trainable_params, micro_batch, model_state, jax.random.fold_in(dropout_key, index), totals)
        return (jax.tree.map(jnp.add, grads_sum, grads), model_state), (loss, accuracy, extra)

      zeros = jax.tree.map(jnp.zeros_like, trainable_params)
      (grads, model_state), (losses, accuracies, extras) = jax.lax.scan(
          one, (zeros, state.model_state), (jnp.arange(accumulate), micro))
      grads = jax.tree.map(lambda g: g / accumulate, grads)
      loss, accuracy, extra = losses.mean(), accuracies.mean(), jax.tree.map(jnp.mean, extras)
    # The optimizer sees the full tree; frozen leaves get zeros that its 'frozen' entry (set_to_zero) ignores, so
    # XLA removes them.
    full_grads = layout.opt_view(combine(state.params, grads, jax.tree.map(jnp.zeros_like, frozen_params)))
    trains = lambda path: layout.path_of(path) in trainable
    # A stacked parameter is differentiated whole, so a frozen segment of it carries a real gradient: zero it, or
    # transformations that see every leaf (clip_by_global_norm) would count it and scanned runs would differ from
    # unrolled ones.
    full_grads = map_with_path(lambda path, g: g if trains(path) else jnp.zeros_like(g), full_grads)
    opt_params = layout.opt_view(state.params)
    updates, opt_state = tx.update(full_grads, state.opt_state, opt_params)
    # Frozen leaves are passed through untouched (not p + 0, which would turn -0.0 into 0.0): bit-identical.
    params = layout.opt_unview(map_with_path(lambda path, p, u: p + u.astype(p.dtype) if trains(path) else p,
                                             opt_params, updates))
    metrics = {
        "loss": loss,
        "accuracy": accuracy,
        "grad_norm": optax.global_norm(select(full_grads, trains)),
        **extra,
    }
    for label, lr_fn in lr_by_label.items():
      metrics[f"learning_rate/{label}"] = jnp.asarray(lr_fn(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state)
    return new_state, metrics

  return train_step


def task_weights(weights: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  """A task's item weights with rehearsed source rows (scored by the rehearsal regularizer instead) left out."""
  if "source_mask" not in batch:
    return weights
  source = source_rows(batch).astype(weights.dtype)
  return weights * (1.0 - source).reshape(source.shape + (1,) * (weights.ndim - 1))  # (B,) over (B,) or (B, L-1)


def row_totals(batch: dict[str, jax.Array], weights: jax.Array) -> dict[str, jax.Array]:
  """What the whole batch's means divide by: the task's item weight, and its target and rehearsed source rows."""
  source = source_rows(batch)
  return {"task": task_weights(weights, batch).sum(), "source": source.sum(), "target": (1.0 - source).sum()}


def to_compute_dtype(tree: Any, compute_dtype: str, keep: tuple[str, ...] = ()) -> Any:
  """Floating-point leaves cast to the compute dtype (mixed precision), except those whose path matches a regex in
  `keep`; integer ids, masks and labels unchanged."""
  if compute_dtype == "float32":
    return tree
  dtype = jnp.dtype(compute_dtype)
  kept = [re.compile(pattern) for pattern in keep]

  def cast(path: str, x: jax.Array) -> jax.Array:
    if not jnp.issubdtype(x.dtype, jnp.floating) or any(r.search(path) for r in kept):
      return x
    return x.astype(dtype)

  return map_with_path(cast, tree)


def make_eval_step(graphdef: nnx.GraphDef, forward: Callable[..., jax.Array] = classify,
                   task: str = "classification", compute_dtype: str = "float32",
                   keep_float32: tuple[str, ...] = ()) -> Callable[[dict, dict], dict]:
  """Builds `eval_step(weights, batch) -> sums` over a padded batch with a 0/1 'mask' (padding never counts).

  `weights` is {'params': ..., 'model_state': ...}: evaluation needs no optimizer state. The loss is the plain
  negative log-likelihood whatever `train.label_smoothing` is: it is what perplexity, early stopping and
  comparisons across runs need (smoothing adds the cross-entropy against the uniform distribution).
  """

  def eval_step(weights: dict[str, Any], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    model = nnx.merge(graphdef, to_compute_dtype(weights["params"], compute_dtype, keep_float32),
                      weights["model_state"])
    logits = forward(model, to_compute_dtype(batch, compute_dtype), train=False).astype(jnp.float32)
    scored = score(logits, batch, 0.0)
    example_mask = batch["mask"].astype(jnp.float32)
    # (B,) padding mask over items of shape (B,) or (B, L-1)
    weights = scored.weights * example_mask.reshape(example_mask.shape + (1,) * (scored.weights.ndim - 1))
    sums = {"loss_sum": jnp.sum(scored.losses * weights), "correct": jnp.sum(scored.correct * weights),
            "count": jnp.sum(weights), "examples": jnp.sum(example_mask)}
    if per_token:
      sums["tokens"] = sums["count"]
    if per_class:  # (C,) per class: examples, those right, and predictions of it (scatter-adds: O(B + C))
      empty = jnp.zeros(logits.shape[-1], jnp.float32)
      sums["class_support"] = empty.at[scored.labels].add(weights)
      sums["class_correct"] = empty.at[scored.labels].add(scored.correct * weights)
      sums["class_predicted"] = empty.at[scored.predicted].add(weights)
    return sums

  score, per_token, per_class = TASKS.get(task).score, TASKS.get(task).per_token, TASKS.get(task).per_class
  return eval_step


def compile_train_step(train_step, abstract_state: TrainState, train_batch: dict, mesh: Mesh):
  """Compiles the train step ahead of time for abstract inputs (ShapeDtypeStructs carrying shardings).

  Shardings are explicit: state as given, batch over the data-parallel axes, metrics replicated; the state is
  donated (updated in place). Compiling ahead of time keeps compilation out of every timing and gives the planner
  `memory_analysis()` / `cost_analysis()` of exactly the program that runs.
  """
  state_shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract_state)
  train = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding(mesh)),
                  out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))
  return train.lower(abstract_state, train_batch).compile()


def compile_eval_step(eval_step, abstract_weights: dict, eval_batch: dict, mesh: Mesh):
  weight_shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract_weights)
  evaluate = jax.jit(eval_step, in_shardings=(weight_shardings, batch_sharding(mesh)),
                     out_shardings=replicated(mesh))
  return evaluate.lower(abstract_weights, eval_batch).compile()
