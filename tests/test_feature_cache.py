"""Feature extraction: cached features give the head the uncached path learns; closed-form probes."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_config
from finetune import train as train_lib
from finetune.checkpoint import read_checkpoint_arrays
from finetune.data.dataset import ArraySplit
from finetune.data.pipeline import InputPipeline
from finetune.errors import FinetuneError
from finetune.methods import feature_cache

PROBE = {"patterns": ("^(?!head/)",)}  # everything but the head frozen
TINY_BERT = {"name": "bert", "vocab_size": 50, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
             "intermediate_size": 32, "max_position_embeddings": 16}
TINY_LSTM = {"name": "lstm", "vocab_size": 50, "embed_size": 8, "hidden_size": 12, "num_layers": 2, "head_hidden": 6,
             "embed_dropout": 0.0, "input_dropout": 0.0, "weight_dropout": 0.0, "hidden_dropout": 0.0}
TOKENS = {"name": "synthetic", "batch_size": 8, "eval_batch_size": 8, "eval_splits": ("test",),
          "validation_fraction": 0.0, "options": {"kind": "tokens", "num_examples": 64, "length": 8, "vocab_size": 50}}


def _probe_config(cache: bool, **extra):
  return tiny_config(freeze=PROBE, features={"cache": cache, **extra},
                     train={"steps": 25, "log_every": 5, "checkpoint_every": 0},
                     optimizer={"learning_rate": 1e-2, "weight_decay": 1e-3})


def test_cached_and_uncached_probes_learn_the_same_head(tmp_path):
  uncached = train_lib.train_and_evaluate(_probe_config(False), str(tmp_path / "uncached"))["train"]
  cached = train_lib.train_and_evaluate(_probe_config(True), str(tmp_path / "cached"))["train"]
  a = read_checkpoint_arrays(str(tmp_path / "uncached" / "checkpoints" / "25"))
  b = read_checkpoint_arrays(str(tmp_path / "cached" / "checkpoints" / "25"))
  for path in a["params"]:
    if path.startswith("head/"):
      np.testing.assert_allclose(b["params"][path], a["params"][path], rtol=1e-4, atol=1e-5, err_msg=path)
      assert not np.allclose(a["params"][path], 0.0)
    else:  # the backbone is untouched either way, and in the cached run it is never even read by the step
      np.testing.assert_array_equal(b["params"][path], a["params"][path])
  for path in a["model_state"]:
    np.testing.assert_array_equal(b["model_state"][path], a["model_state"][path])
  assert cached["final"]["validation"]["accuracy"] == pytest.approx(uncached["final"]["validation"]["accuracy"],
                                                                    abs=1 / 360)
  assert cached["feature_extraction_seconds"] > 0 and uncached["feature_extraction_seconds"] is None


def test_every_split_is_extracted_by_one_compiled_backbone(tmp_path, monkeypatch):
  """(A jit per split compiled the same backbone once per split, plus once more on a first example to learn the
  feature width: for a ViT or BERT, seconds to tens of seconds each.) Traces count compilations here: one jit
  object traces once for one input shape; the width comes from one more trace, by jax.eval_shape."""
  traces = []
  embed = feature_cache._embed  # pylint: disable=protected-access

  def counting_embed(graphdef):
    inner = embed(graphdef)

    def traced(weights, batch):
      traces.append(next(iter(batch.values())).shape)
      return inner(weights, batch)
    return traced

  monkeypatch.setattr(feature_cache, "_embed", counting_embed)
  config = _probe_config(True, max_memory_mb=0.01)
  train_lib.train_and_evaluate(config, str(tmp_path))
  assert traces == [(1, 8, 8, 1), (config.data.eval_batch_size, 8, 8, 1)], traces  # width; one extraction program


def test_features_spill_to_disk_when_over_the_memory_limit_and_train_the_same_head(tmp_path):
  spilled = train_lib.train_and_evaluate(_probe_config(True, max_memory_mb=0.01), str(tmp_path / "disk"))["train"]
  saved = sorted(p.name for p in (tmp_path / "disk" / "features").iterdir())
  assert saved == ["train.npy", "validation.npy"]
  assert np.load(tmp_path / "disk" / "features" / "train.npy").shape == (1797 - 359, 16)
  # What training read from disk is what it holds in memory under the default limit.
  in_memory = train_lib.train_and_evaluate(_probe_config(True), str(tmp_path / "memory"))["train"]
  assert not (tmp_path / "memory" / "features").exists()
  heads = [read_checkpoint_arrays(str(tmp_path / run / "checkpoints" / "25"))["params"] for run in ("disk", "memory")]
  for path in heads[1]:
    np.testing.assert_array_equal(heads[0][path], heads[1][path], err_msg=path)
  for metric in ("accuracy", "loss"):
    assert spilled["final"]["validation"][metric] == in_memory["final"]["validation"][metric]


def test_caching_refuses_setups_where_it_would_differ():
  for sections, message in [
      ({}, "needs every parameter outside head/ frozen"),
      ({"freeze": PROBE, "data": {"augment": {"flip": True}}}, "augmentation cannot apply"),
      ({"freeze": {**PROBE, "train_bn": True}}, "BatchNorm cannot train"),
      # BERT's dropout defaults to 0.1: the default counts, not only a value set in config.model.
      ({"freeze": PROBE, "model": TINY_BERT, "data": TOKENS},
       r"the backbone drops out \(dropout \(0.1\), embeddings/dropout \(0.1\), .*set the model's dropout rates to 0"),
      ({"freeze": PROBE, "model": {**TINY_LSTM, "embed_dropout": 0.1}, "data": TOKENS}, r"embed_dropout \(0.1\)"),
      ({"freeze": PROBE, "unfreeze": {"mode": "gradual", "every_steps": 2}}, "unfreeze.mode='none'"),
  ]:
    with pytest.raises(FinetuneError, match=message):  # (what the config alone decides, when it is loaded)
      config = tiny_config(features={"cache": True}, **sections)
      stage = train_lib.build_stage(config)
      feature_cache.check_cacheable(stage.strategy, stage.pipeline, config.freeze.train_bn, stage.abstract_model)
  # A later stage's augmentation is refused before the first stage trains (it failed when the probe opened).
  with pytest.raises(FinetuneError, match="augmentation cannot apply.*stage 'probe'"):
    tiny_config(data={"augment": {"flip": True}}, stages={"pretrain": {}, "probe": {
        "init_from": "stage:pretrain", "freeze": PROBE, "features": {"cache": True}}})


def test_a_head_with_batchnorm_and_dropout_learns_the_same_from_cached_features(tmp_path):
  """ULMFiT's pooling head trains its BatchNorm and drops out: the cached step runs it in training mode too."""
  runs = {}
  for cache in (False, True):
    config = tiny_config(model=TINY_LSTM, data=TOKENS, freeze=PROBE, features={"cache": cache},
                         train={"steps": 6, "log_every": 3, "checkpoint_every": 0})
    train_lib.train_and_evaluate(config, str(tmp_path / str(cache)))
    runs[cache] = read_checkpoint_arrays(str(tmp_path / str(cache) / "checkpoints" / "6"))
  for collection in ("params", "model_state"):
    for path, value in runs[False][collection].items():
      if path.startswith("head/"):
        np.testing.assert_allclose(runs[True][collection][path], value, rtol=1e-4, atol=1e-5, err_msg=path)
  assert np.abs(runs[True]["model_state"]["head/norm_1/mean"]).max() > 0  # (the premise: its BatchNorm trained)


def _features_pipeline(train_x, train_y, eval_x, eval_y, num_classes):
  return InputPipeline(
      dataset_name="synthetic", class_names=tuple(str(i) for i in range(num_classes)),
      train=ArraySplit({"features": train_x, "label": train_y}),
      eval_splits={"test": ArraySplit({"features": eval_x, "label": eval_y})}, batch_size=8, eval_batch_size=8,
      seed=0)


def test_ridge_probe_is_the_closed_form_solution():
  rng = np.random.default_rng(0)
  true_weights = rng.normal(size=(5, 3))
  x = rng.normal(size=(200, 5)).astype(np.float32)
  y = np.argmax(x @ true_weights, axis=1)
  test_x = rng.normal(size=(100, 5)).astype(np.float32)
  test_y = np.argmax(test_x @ true_weights, axis=1)
  pipeline = _features_pipeline(x, y, test_x, test_y, 3)
  result = feature_cache.closed_form_probes(("ridge", "logistic"), pipeline, l2=1e-3)
  # Reference: standardised features, least squares with bias column, penalty on weights only.
  mean, std = x.mean(0), x.std(0) + 1e-6
  xs = np.c_[(x - mean) / std, np.ones(len(x))]
  penalty = 1e-3 * len(x) * np.diag([1.0] * 5 + [0.0])
  w = np.linalg.solve(xs.T @ xs + penalty, xs.T @ np.eye(3)[y])
  expected = np.mean(np.argmax(np.c_[(test_x - mean) / std, np.ones(100)] @ w, 1) == test_y)
  assert result["ridge"]["test"] == pytest.approx(expected)
  assert expected > 0.8 and result["logistic"]["test"] > 0.8  # linearly separable classes


def test_closed_form_probes_in_the_summary(tmp_path):
  config = tiny_config(features={"closed_form": ("ridge", "logistic")}, train={"steps": 4, "checkpoint_every": 0})
  summary = train_lib.train_and_evaluate(config, str(tmp_path))["train"]
  assert set(summary["closed_form_probes"]) == {"ridge", "logistic"}
  held_out = summary["final"]["validation"]["num_examples"]
  for probe in ("ridge", "logistic"):
    accuracies = summary["closed_form_probes"][probe]
    assert list(accuracies) == ["validation"], (probe, accuracies)
    correct = accuracies["validation"] * held_out  # scored on the whole validation split: right answers / its size
    assert 0 <= round(correct) <= held_out and correct == pytest.approx(round(correct)), (probe, accuracies)
  with pytest.raises(FinetuneError, match="unknown closed-form probe 'lasso'.*valid: ridge, logistic"):
    tiny_config(features={"closed_form": ("lasso",)})  # caught when the config loads, before any training
