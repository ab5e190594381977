"""The diagonal Fisher information of a classifier, from per-example gradients.

F_i = E_x E_y~q(y|x) [ (d/dtheta_i log p(y|x, theta))^2 ], estimated over N examples: each example's gradient is
computed on its own (`jax.vmap` of `jax.grad`), squared, then averaged. Squaring the gradient of a minibatch mean
instead, as common reference implementations do, estimates (E g)^2, which is ~N times smaller and not the Fisher.

Label modes (q):
* `true`: y sampled from the model's own predictive distribution p(y|x) (the Fisher of the model);
* `empirical`: y = the dataset label (the "empirical Fisher");
* `expected`: every label, weighted by p(y|x): sum_y p(y|x) g_y^2 (the exact expectation, C gradients per example).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from finetune import files, interrupts
from finetune.errors import FinetuneError
from finetune.partition import flatten
from finetune.sharding import batch_sharding, data_parallel_size, to_host

LABEL_MODES = ("true", "empirical", "expected")


def log_likelihoods(logits: jax.Array) -> jax.Array:
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def sampled_labels(logits: jax.Array, key: jax.Array) -> jax.Array:
  """The `true`-mode labels: one draw per example from softmax(logits)."""
  return jax.random.categorical(key, logits.astype(jnp.float32), axis=-1)


def make_fisher_batch(apply: Callable[[Any, dict, Any], jax.Array], label_mode: str) -> Callable:
  """`(params, batch, keys, constants) -> {path: sum over the batch of squared per-example gradients}`; `keys`: one
  PRNG key per example (the `true` mode's label draws).

  `apply(params, single_example_batch, constants) -> logits (1, C)`; `params` are the parameters differentiated (a
  pytree), `constants` what the model reads without being differentiated (BatchNorm statistics): an argument, as
  arrays a jitted function closed over would be compiled into the program as constants.
  Examples with batch['mask'] == 0 (padding) contribute nothing.
  """
  if label_mode not in LABEL_MODES:
    raise FinetuneError(f"config.regularize.ewc.label_mode={label_mode!r}; valid: {', '.join(LABEL_MODES)}")

  def one_example(params, example, key, constants):
    batch = jax.tree.map(lambda x: x[None], example)
    logits = apply(params, batch, constants)[0]
    probabilities = jax.nn.softmax(logits.astype(jnp.float32))

    def grad_for(label):
      return jax.grad(lambda p: -log_likelihoods(apply(p, batch, constants))[0, label])(params)

    if label_mode == "expected":
      grads = jax.vmap(grad_for)(jnp.arange(logits.shape[-1]))  # (C, ...) per leaf
      squared = jax.tree.map(lambda g: jnp.einsum("c,c...->...", probabilities, g ** 2), grads)
    else:
      label = example["label"] if label_mode == "empirical" else sampled_labels(logits, key)
      squared = jax.tree.map(lambda g: g ** 2, grad_for(label))
    weight = example["mask"].astype(jnp.float32) if "mask" in example else 1.0
    return jax.tree.map(lambda s: s * weight, squared)

  def fisher_batch(params, batch, keys, constants):
    per_example = jax.vmap(one_example, in_axes=(None, 0, 0, None))(params, batch, keys, constants)
    return jax.tree.map(lambda s: s.sum(axis=0), per_example)

  return fisher_batch


def estimate(apply: Callable[[Any, dict, Any], jax.Array], params: Any, batches, label_mode: str, key: jax.Array,
             num_examples: int, constants: Any = None, mesh: jax.sharding.Mesh | None = None) -> dict[str, np.ndarray]:
  """The diagonal Fisher over the first `num_examples` examples of `batches` (dicts with 'label', optional 'mask'):
  {path: array shaped like the parameter}. `apply` and `constants` as in `make_fisher_batch`; place `params` and
  `constants` on their devices before the call (else every batch sends them again). `mesh`: the batches' examples
  are split over its data-parallel axes (every process passes the same whole batches); None: one device.

  Every batch keeps its shape, so one program serves them all: rows past `num_examples` are masked, not cut off,
  and rows are padded to a multiple of the data-parallel size. The j-th example used draws (label_mode 'true')
  with fold_in(key, j), whatever the batches: keys split per batch made the estimate depend on `ewc.batch_size`
  (32% apart for batches of 20 and 50), which the saved Fisher's name does not record."""
  fisher_batch = jax.jit(make_fisher_batch(apply, label_mode))
  sharding = None if mesh is None else batch_sharding(mesh)
  parts = 1 if mesh is None else data_parallel_size(mesh)
  total, seen, position = None, 0, 0
  for batch in batches:
    if seen >= num_examples:
      break
    rows = len(batch["label"])
    used = min(rows, num_examples - seen)
    mask = np.asarray(batch.get("mask", np.ones(rows)), np.float32) * (np.arange(rows) < used)
    keys = np.asarray(jax.vmap(lambda j: jax.random.fold_in(key, j))(np.arange(position, position + used)))
    position += used
    padded = -(-rows // parts) * parts  # rows, rounded up to a multiple of the data-parallel size
    batch = {**{k: _pad_rows(v, padded) for k, v in batch.items()}, "mask": _pad_rows(mask, padded)}
    keys = _pad_rows(keys, padded)  # the unused rows' keys are zeros; their mask is 0
    if sharding is not None:
      batch, keys = (jax.tree.map(lambda v: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i]), x)
                     for x in (batch, keys))
    sums = fisher_batch(params, batch, keys, constants)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    seen += int(mask.sum())
    interrupts.raise_if_requested()  # (a Ctrl-C that a library dropped; see finetune/interrupts.py)
  if not seen:
    raise FinetuneError("no examples to estimate the Fisher information from; check the source stage's data")
  return {path: np.asarray(value) / seen for path, value in flatten(to_host(total)).items()}


def _pad_rows(values: np.ndarray, rows: int) -> np.ndarray:
  values = np.asarray(values)
  return np.pad(values, [(0, rows - len(values))] + [(0, 0)] * (values.ndim - 1)) if rows > len(values) else values


def save(path: str, fisher: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
  """Fisher next to the source stage's checkpoints (safetensors + json), written atomically, reused by later
  stages and re-runs."""
  # Sweep points that start from one source run may save its Fisher at the same time: the same content, so the
  # last one to land wins (finetune/files.py).
  # The arrays first: the json, which names the source run they belong to, is written once they are complete.
  with files.atomic_path(path) as tmp:
    files.save_safetensors({k: np.ascontiguousarray(v) for k, v in fisher.items()}, tmp)
  files.write_text(path + ".json", json.dumps(meta, indent=2))


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  if not (os.path.isfile(path) and os.path.isfile(path + ".json")):
    return None
  with open(path + ".json") as f:
    return load_file(path), json.load(f)
