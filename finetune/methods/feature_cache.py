"""Feature extraction with cached features (linear probe on a frozen backbone), and closed-form probes.

With `config.features.cache`, the backbone (`model.embed`, inference mode: BatchNorm statistics, no dropout) runs
once over every example; training then reads the cached features and runs only the head, for as many epochs as
the config says. The train state still holds every parameter, so checkpoints, `init_from` of later stages and
resumption are unchanged; the backbone parameters are simply never read by the step. With no augmentation and no
dropout the head equals the one the uncached path (everything but the head frozen) learns, within float tolerance:
the batches, initialisation and optimizer are the same. The backbone runs in float32 whatever
`train.compute_dtype` is (features computed once cost little at full precision); under bfloat16 the cached head
then differs from the uncached one by bfloat16's rounding of the backbone (relative 2-4e-3 in one check).

Features live in memory, or in memory-mapped `.npy` files under `<run dir>/features/` when they exceed
`config.features.max_memory_mb`.

Closed-form probes (`config.features.closed_form`): ridge regression on one-hot targets (solved exactly) and
multinomial logistic regression (scikit-learn, L-BFGS) on the final model's features — fast baselines that
researchers report next to fine-tuning.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from finetune import interrupts
from finetune.data.dataset import ArraySplit, Split
from finetune.data.pipeline import InputPipeline, to_global
from finetune.errors import FinetuneError
from finetune.methods import prompt_tuning
from finetune.sharding import batch_sharding
from finetune.step import model_inputs


def backbone_dropout(model: nnx.Module) -> list[str]:
  """'path (rate)' of every active dropout outside the head: nnx.Dropout layers, and a model's own stochastic
  rates (`embed_dropout`, LSTM's whole-word embedding dropout). Read from the built model, so defaults count."""
  found = [f"{'/'.join(map(str, path))} ({node.rate})" for path, node in nnx.iter_graph(model)
           if isinstance(node, nnx.Dropout) and node.rate > 0 and path and path[0] != "head"]
  if getattr(model, "embed_dropout", 0.0) > 0:
    found.append(f"embed_dropout ({model.embed_dropout})")
  return found


def check_cacheable(strategy, pipeline: InputPipeline, train_bn: bool, model: nnx.Module) -> None:
  """Caching is exact only when nothing but the head trains and inputs are neither augmented nor dropped out."""
  dropouts = backbone_dropout(model)
  if dropouts:
    raise FinetuneError(f"config.features.cache computes features once, without dropout, but the backbone drops "
                        f"out ({', '.join(dropouts[:3])}{', ...' if len(dropouts) > 3 else ''}); set the model's "
                        "dropout rates to 0 in config.model (its defaults count too)")
  if train_bn:
    raise FinetuneError("config.features.cache computes features once, so BatchNorm cannot train: set "
                        "config.freeze.train_bn=False")
  trainable = strategy.trainable(0)
  not_head = sorted(p for p in trainable if not p.startswith("head/"))
  if not_head or len(strategy.phases) > 1:
    raise FinetuneError("config.features.cache needs every parameter outside head/ frozen for the whole stage "
                        f"(trainable now: {', '.join(not_head[:3]) or 'unfreezing phases'}); set "
                        "config.freeze.patterns=('^(?!head/)',) and config.unfreeze.mode='none'")
  if pipeline.crop_padding or pipeline.flip:
    raise FinetuneError("config.features.cache computes each example's features once, so augmentation cannot apply: "
                        "set config.data.augment.crop_padding=0 and flip=False")


def embedder(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh) -> Callable[[dict[str, Any], dict], jax.Array]:
  """The jitted backbone, (weights, global batch) -> features sharded as the batch: made once per stage, so every
  split's extraction reuses one compiled program (a jit per split compiled the same backbone once per split)."""
  return jax.jit(_embed(graphdef), out_shardings=batch_sharding(mesh))


def extract(embed_fn: Callable[[dict[str, Any], dict], jax.Array], weights: dict[str, Any], pipeline: InputPipeline,
            data: Split, mesh: jax.sharding.Mesh, disk_dir: str | None, name: str) -> np.ndarray:
  """Backbone features of every example of `data`, in order: (N, feature_dim) float32. `embed_fn`: `embedder`'s."""
  spec = batch_sharding(mesh)

  def fetch(features: jax.Array) -> np.ndarray:
    features = multihost_utils.process_allgather(features, tiled=True) if jax.process_count() > 1 else features
    return np.asarray(jax.device_get(features), np.float32)

  chunks, in_flight = [], None
  for batch in pipeline.ordered_batches(data):
    features = embed_fn(weights, to_global(_inputs(batch), spec))  # dispatched; runs while the previous is fetched
    if in_flight is not None:
      chunks.append(fetch(in_flight))
    in_flight = features
    interrupts.raise_if_requested()  # (a Ctrl-C that a library dropped; see finetune/interrupts.py)
  if in_flight is not None:
    chunks.append(fetch(in_flight))
  result = np.concatenate(chunks)[:len(data)]
  if disk_dir:
    os.makedirs(disk_dir, exist_ok=True)
    path = os.path.join(disk_dir, f"{name}.npy")
    np.save(path + ".tmp.npy", result)
    os.replace(path + ".tmp.npy", path)
    result = np.load(path, mmap_mode="r")
  return result


def _embed(graphdef: nnx.GraphDef) -> Callable[[dict[str, Any], dict[str, jax.Array]], jax.Array]:
  def embed(weights, batch):
    model = nnx.merge(graphdef, weights["params"], weights["model_state"])
    inputs, _ = prompt_tuning.prompted_inputs(model, model_inputs(model, batch))  # as step.embed_fn: the prompt too
    return model.embed(*inputs, train=False)
  return embed


def _inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: v for k, v in batch.items() if k not in ("label", "mask")}


def feature_shaped_pipeline(graphdef: nnx.GraphDef, abstract_weights: dict[str, Any],
                            pipeline: InputPipeline) -> InputPipeline:
  """What `cached_pipeline` returns, with zero features of the backbone's width and nothing computed: the shapes
  `finetune plan` compiles a cached stage's step from (the width comes from `jax.eval_shape`)."""
  width = _feature_width(graphdef, abstract_weights, pipeline)

  def zeros(split: Split) -> ArraySplit:  # a read-only view of one row: no memory per example
    return ArraySplit({"features": np.broadcast_to(np.zeros(width, np.float32), (len(split), width)),
                       "label": split.labels()})

  return dataclasses.replace(pipeline, train=zeros(pipeline.train),
                             eval_splits={k: zeros(v) for k, v in pipeline.eval_splits.items()})


def cached_pipeline(graphdef: nnx.GraphDef, weights: dict[str, Any], pipeline: InputPipeline,
                    mesh: jax.sharding.Mesh, run_dir: str, max_memory_mb: float) -> InputPipeline:
  """The same pipeline (sizes, seed, batch order) over cached features instead of images."""
  num_examples = len(pipeline.train) + sum(len(s) for s in pipeline.eval_splits.values())
  bytes_needed = num_examples * _feature_width(graphdef, weights, pipeline) * 4
  disk_dir = os.path.join(run_dir, "features") if bytes_needed > max_memory_mb * 2**20 else None
  embed_fn = embedder(graphdef, mesh)

  def cache(split: Split, name: str) -> ArraySplit:
    return ArraySplit({"features": extract(embed_fn, weights, pipeline, split, mesh, disk_dir, name),
                       "label": split.labels()})

  return dataclasses.replace(pipeline, train=cache(pipeline.train, "train"),
                             eval_splits={k: cache(v, k) for k, v in pipeline.eval_splits.items()})


def _feature_width(graphdef: nnx.GraphDef, weights: dict[str, Any], pipeline: InputPipeline) -> int:
  """The backbone's feature width, from `jax.eval_shape` (nothing computed or compiled)."""
  return jax.eval_shape(_embed(graphdef), weights, _inputs(_first(pipeline.train).features)).shape[-1]


def _first(split: Split) -> ArraySplit:
  return ArraySplit(split.take(np.arange(1)))


CLOSED_FORM_PROBES = ("ridge", "logistic")


def closed_form_probes(names: tuple[str, ...], pipeline: InputPipeline, l2: float) -> dict[str, dict[str, float]]:
  """{probe: {eval split: accuracy}} for ridge / logistic probes fitted on the (cached) training features."""
  train_x = np.asarray(pipeline.train.take(np.arange(len(pipeline.train)))["features"], np.float64)
  train_y = pipeline.train.labels()
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6  # standardise: one l2 suits every backbone
  results = {}
  for name in names:
    if name == "ridge":
      predict = _ridge(((train_x - mean) / std), train_y, pipeline.num_classes, l2)
    elif name == "logistic":
      predict = _logistic(((train_x - mean) / std), train_y, l2)
    else:
      raise FinetuneError(f"unknown closed-form probe {name!r} in config.features.closed_form; valid: "
                          f"{', '.join(CLOSED_FORM_PROBES)}")
    results[name] = {}
    for split, data in pipeline.eval_splits.items():
      x = (np.asarray(data.take(np.arange(len(data)))["features"], np.float64) - mean) / std
      results[name][split] = float(np.mean(predict(x) == data.labels()))
  return results


def _ridge(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float):
  """Least squares on one-hot targets with an L2 penalty (bias unpenalised): W = (XᵀX + λI)⁻¹ Xᵀ(Y − ȳ)."""
  targets = np.eye(num_classes)[y]
  target_mean = targets.mean(0)
  weights = np.linalg.solve(x.T @ x + l2 * len(x) * np.eye(x.shape[1]), x.T @ (targets - target_mean))
  return lambda features: np.argmax(features @ weights + target_mean, axis=1)


def _logistic(x: np.ndarray, y: np.ndarray, l2: float):
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top

  model = LogisticRegression(C=1.0 / max(l2 * len(x), 1e-12), max_iter=1000)
  model.fit(x, y)
  return model.predict


def classify_features(model: nnx.Module, batch: dict[str, jax.Array], *, train: bool = False,
                      rngs: nnx.Rngs | None = None) -> jax.Array:
  """The forward pass of a cached stage: the head on precomputed features, in training mode when the head has one
  (ULMFiT's pooling head: BatchNorm and dropout), as the uncached step runs it."""
  if "train" in inspect.signature(type(model.head).__call__).parameters:
    return model.head(batch["features"], train=train, rngs=rngs).astype(jnp.float32)
  return model.head(batch["features"]).astype(jnp.float32)
