"""What a model's outputs are scored against: one small contract per task, found by name in `TASKS`.

A task turns (logits, batch) into per-item losses, weights and correctness; the train step averages the losses
over the weights, the eval step sums them (times the padding mask), so classification (one item per example) and
causal language modelling (one item per predicted token) share both steps.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from finetune.errors import FinetuneError
from finetune.models.layers import segment_starts
from finetune.registry import Registry


class Scored(NamedTuple):
  losses: jax.Array  # per item: (B,) for classification, (B, L-1) for causal LM
  weights: jax.Array  # same shape; 0 for items that do not count (padding, prompt tokens)
  correct: jax.Array  # same shape; 1 where the arg-max prediction is right
  # Class tasks: each item's label and arg-max prediction, from which evaluation counts per class (macro-F1,
  # balanced accuracy); None where the "classes" are a vocabulary (per-class counts of a language model's tokens
  # would be as large as its vocabulary and say little).
  labels: jax.Array | None = None
  predicted: jax.Array | None = None


class Task(NamedTuple):
  score: Callable[[jax.Array, dict[str, jax.Array], float], Scored]  # (logits, batch, label smoothing)
  # The items' weights from the batch alone (they never depend on the outputs): gradient accumulation totals them
  # over the whole batch before its micro-batches run, so the accumulated loss is the whole batch's mean.
  weights: Callable[[dict[str, jax.Array]], jax.Array]
  per_token: bool = False  # items are tokens: evaluation also reports num_tokens and perplexity
  per_class: bool = False  # `score` gives labels and predictions: evaluation also reports per-class scores
  batch_keys: tuple[str, ...] = ("label",)  # the batch entries `score` and `weights` read


TASKS: Registry[Task] = Registry("task")


def evaluation_keys(task: Task) -> tuple[str, ...]:
  """The metrics an evaluation of a split reports (`train.evaluate`), which early stopping may watch."""
  return (("loss", "accuracy", "num_examples", "examples_per_s") +
          (("num_tokens", "perplexity") if task.per_token else ()) +
          (("macro_f1", "balanced_accuracy") if task.per_class else ()))


def _cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float) -> jax.Array:
  one_hot = jax.nn.one_hot(targets, logits.shape[-1])
  return optax.softmax_cross_entropy(logits, optax.smooth_labels(one_hot, label_smoothing) if label_smoothing
                                     else one_hot)


def _classification_weights(batch: dict[str, jax.Array]) -> jax.Array:
  return jnp.ones(batch["label"].shape, jnp.float32)


def classification(logits: jax.Array, batch: dict[str, jax.Array], label_smoothing: float = 0.0) -> Scored:
  """One label per example: logits (B, C), batch['label'] (B,)."""
  if logits.ndim != 2:  # (found while the step is traced, before anything runs; else a broadcasting traceback)
    raise FinetuneError(f"task 'classification' scores one row of class logits per example, but the model outputs "
                        f"shape {tuple(logits.shape)}, a prediction per token: a language model needs "
                        "config.task='causal_lm' (the LSTM classifies with config.model.output='classifier')")
  labels, predicted = batch["label"], jnp.argmax(logits, -1)
  correct = (predicted == labels).astype(jnp.float32)
  return Scored(_cross_entropy(logits, labels, label_smoothing), _classification_weights(batch), correct, labels,
                predicted)


def _causal_lm_weights(batch: dict[str, jax.Array]) -> jax.Array:
  mask = batch["attention_mask"]
  counted = batch["loss_mask"] > 0 if "loss_mask" in batch else mask > 0
  # A packed row's first token of each conversation cannot be predicted from the one before (another
  # conversation), as a row's very first token is never predicted: neither is counted.
  return (counted & ~segment_starts(mask))[:, 1:].astype(jnp.float32)


def causal_lm(logits: jax.Array, batch: dict[str, jax.Array], label_smoothing: float = 0.0) -> Scored:
  """Next-token prediction: logits (B, L, V) at position t predict input_ids[t + 1]. Tokens count where
  batch['loss_mask'] (response tokens of instruction data; else the attention mask) is nonzero, except where a
  packed row's next conversation begins."""
  if logits.ndim != 3:  # (as in `classification`)
    raise FinetuneError(f"task 'causal_lm' scores next-token logits (batch, length, vocab), but the model outputs "
                        f"shape {tuple(logits.shape)}, one row per example: a classifier needs "
                        "config.task='classification' (the LSTM predicts tokens with config.model.output='lm')")
  targets = batch["input_ids"][:, 1:]
  predictions = logits[:, :-1]
  correct = (jnp.argmax(predictions, -1) == targets).astype(jnp.float32)
  return Scored(_cross_entropy(predictions, targets, label_smoothing), _causal_lm_weights(batch), correct)


TASKS.register("classification")(Task(classification, _classification_weights, per_class=True))
TASKS.register("causal_lm")(Task(causal_lm, _causal_lm_weights, per_token=True,
                                 batch_keys=("input_ids", "attention_mask")))
