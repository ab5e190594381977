"""`finetune eval` as a library call: a finished stage's final weights scored again equal its own final evaluation,
whatever trained them (a cached-feature probe, EWC, QLoRA adapters, layers stacked for scan)."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_config
from finetune import train as train_lib
from finetune.evaluation import evaluate_run
from finetune.errors import FinetuneError
from finetune.recipes import PROBE_FREEZE


def _assert_equals_its_final_evaluation(run_dir, results):
  final = json.load(open(run_dir / "summary.json"))["final"]
  assert results.keys() == final.keys()
  for split, metrics in final.items():
    assert results[split]["accuracy"] == metrics["accuracy"], split
    assert results[split]["loss"] == pytest.approx(metrics["loss"], rel=1e-5), split


def test_stages_that_trained_otherwise_evaluate_as_they_ended(tmp_path):
  """(The base config's cut_frac, read by the ewc stage's schedule, is in the probe's config.json too: evaluating
  the probe alone refused it as a setting no stage reads.)"""
  config = tiny_config(train={"steps": 4, "log_every": 2, "checkpoint_every": 0}, optimizer={"cut_frac": 0.25},
                       stages={
      "probe": {"freeze": PROBE_FREEZE, "features": {"cache": True}},
      "ewc": {"init_from": "stage:probe", "regularize": {"ewc": {"weight": 10.0, "num_examples": 32}},
              "optimizer": {"schedule": "stlr", "warmup_steps": 0}}})
  train_lib.train_and_evaluate(config, str(tmp_path))
  for stage in ("probe", "ewc"):
    _assert_equals_its_final_evaluation(tmp_path / stage, evaluate_run(str(tmp_path), stage))
  last = {split: metrics["accuracy"] for split, metrics in evaluate_run(str(tmp_path)).items()}
  assert last == {split: metrics["accuracy"] for split, metrics in evaluate_run(str(tmp_path), "ewc").items()}


def test_a_qlora_run_with_stacked_layers_evaluates_as_it_ended(tmp_path):
  config = tiny_config(model={"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 2,
                              "num_heads": 2, "mlp_dim": 32},
                       peft={"method": "lora", "targets": ("query", "value"), "rank": 2, "quantize": "nf4",
                             "quant_block_size": 16, "modules_to_save": ("^head/",)},
                       train={"steps": 4, "log_every": 2, "checkpoint_every": 0, "scan_layers": True})
  train_lib.train_and_evaluate(config, str(tmp_path))
  _assert_equals_its_final_evaluation(tmp_path, evaluate_run(str(tmp_path)))


def test_a_stage_that_turned_peft_off_and_stopped_early_evaluates_on_another_split(tmp_path):
  """(Rebuilt from its own config.json, a stage with method='' under the base config's LoRA settings was refused as
  'PEFT settings without a method', and early stopping on validation refused evaluating test alone.)"""
  vit = {"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32}
  config = tiny_config(
      model=vit, peft={"method": "lora", "targets": ("query",), "rank": 2, "modules_to_save": ("^head/",)},
      data={"name": "synthetic", "batch_size": 8, "eval_batch_size": 8, "validation_fraction": 0.25,
            "eval_splits": ("validation", "test"),
            "options": {"kind": "images", "image_shape": (8, 8, 1), "num_classes": 4, "num_examples": 48}},
      train={"steps": 4, "log_every": 2, "checkpoint_every": 0, "eval_every": 2,
             "early_stopping": {"metric": "validation/accuracy", "patience": 5}},
      stages={"plain": {"peft": {"method": ""}}, "lora": {"init_from": "stage:plain"}})
  train_lib.train_and_evaluate(config, str(tmp_path))
  _assert_equals_its_final_evaluation(tmp_path / "plain", evaluate_run(str(tmp_path), "plain"))
  test_only = evaluate_run(str(tmp_path), "plain", ["data.eval_splits=('test',)"])
  assert list(test_only) == ["test"]
  final = json.load(open(tmp_path / "plain" / "summary.json"))["final"]
  assert test_only["test"]["accuracy"] == final["test"]["accuracy"]


def test_data_whose_classes_differ_from_the_trained_ones_is_refused_finished_or_not(tmp_path):
  """(data.classes renumbers the kept classes 0..n-1: three other classes, or the same three reordered, passed every
  shape check and were scored against a head that means something else: 0.37 and 0.26 for 0.97.)"""
  config = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (16,)}, data={"classes": (0, 1, 2)},
                       train={"steps": 4, "log_every": 2, "checkpoint_every": 2})
  train_lib.train_and_evaluate(config, str(tmp_path))
  for classes, named in (("(2, 1, 0)", "'2', '1', '0'"), ("(3, 4, 5)", "'3', '4', '5'")):
    with pytest.raises(FinetuneError, match=r"the weights were trained on classes \['0', '1', '2'\], in that order, "
                                            rf"but the overrides give \[{named}\]"):
      evaluate_run(str(tmp_path), overrides=[f"data.classes={classes}"])
  _assert_equals_its_final_evaluation(tmp_path, evaluate_run(str(tmp_path), overrides=["data.classes=(0, 1, 2)"]))
  saved = tmp_path / "summary.saved.json"
  (tmp_path / "summary.json").rename(saved)  # unfinished: the classes come from its own data
  with pytest.raises(FinetuneError, match="the weights were trained on classes"):
    evaluate_run(str(tmp_path), overrides=["data.classes=(2, 1, 0)"], unfinished=True)
  unfinished = evaluate_run(str(tmp_path), overrides=["data.eval_batch_size=16"], unfinished=True)
  saved.rename(tmp_path / "summary.json")  # its latest checkpoint is the final one: the same scores, recomputed
  _assert_equals_its_final_evaluation(tmp_path, unfinished)


def test_data_whose_class_names_changed_since_training_is_refused_without_overrides(tiny_checkpoint, tmp_path):
  """(The class check ran only with data overrides: a label renamed in the CSVs renumbered the classes, and
  `finetune eval` scored the head against other labels, accuracy 0.0, without a word.)"""
  data = tmp_path / "data"
  data.mkdir()
  rows = [("purr meow", "cat"), ("wing beak", "bird"), ("bark woof", "dog")] * 4
  for name in ("train.csv", "test.csv"):
    (data / name).write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
  from finetune.config import build_config  # pylint: disable=g-import-not-at-top
  config = build_config({
      "model": {"name": "bert", "hf_config": tiny_checkpoint, "dropout": 0.0},
      "data": {"name": "text_classification", "path": str(data), "batch_size": 4, "eval_batch_size": 12,
               "validation_fraction": 0.0, "eval_splits": ("test",),
               "options": {"train_file": "train.csv", "test_file": "test.csv", "tokenizer": tiny_checkpoint,
                           "max_length": 8}},
      "train": {"steps": 2, "log_every": 2, "checkpoint_every": 0},
      "init_from": tiny_checkpoint, "dont_load": ("^head/",)})
  run = tmp_path / "run"
  train_lib.train_and_evaluate(config, str(run))
  _assert_equals_its_final_evaluation(run, evaluate_run(str(run)))
  for name in ("train.csv", "test.csv"):
    (data / name).write_text((data / name).read_text().replace("bird", "zebra"))
  with pytest.raises(FinetuneError, match=r"trained on classes \['bird', 'cat', 'dog'\], in that order, but the "
                                          r"data now gives \['cat', 'dog', 'zebra'\]"):
    evaluate_run(str(run))


def test_stages_whose_training_schedule_the_evaluation_cannot_rebuild_evaluate_as_they_ended(tmp_path):
  """(Rebuilt for `finetune eval` without its rehearsal rows, a rehearsal stage had 22 steps to its unfreezing
  schedule's 30 and was refused; so was a gradual stage whose smaller validation split, a documented override,
  left fewer steps per epoch than its `every_epochs` schedule needed.)"""
  config = tiny_config(train={"steps": 0, "epochs": 1.0, "log_every": 10, "checkpoint_every": 0}, stages={
      "source": {"data": {"classes": (0, 1, 2, 3, 4)}, "train": {"steps": 4, "epochs": 0.0}},
      "rehearsed": {"data": {"classes": (5, 6, 7, 8, 9)}, "init_from": "stage:source", "dont_load": ("^head/",),
                    "rehearsal": {"fraction": 0.5}, "unfreeze": {"mode": "gradual", "every_steps": 10}},
      "gradual": {"unfreeze": {"mode": "gradual", "every_epochs": 0.25}, "train": {"steps": 34, "epochs": 0.0}}})
  train_lib.train_and_evaluate(config, str(tmp_path))
  for stage in ("rehearsed", "gradual"):
    _assert_equals_its_final_evaluation(tmp_path / stage, evaluate_run(str(tmp_path), stage))
  assert set(evaluate_run(str(tmp_path), "gradual", ["data.validation_fraction=0.05"])) == {"validation"}
  # Stratified, the carving takes other rows (some the stage trained on).
  with pytest.raises(FinetuneError, match=r"config.data.stratify=True would carve the validation split from rows "
                                          r"the stage trained on \(it carved with stratify=False\)"):
    evaluate_run(str(tmp_path), "gradual", ["data.stratify=True"])


def test_runs_that_share_a_workdir_keep_each_other_s_stages(tmp_path):
  """One variant per run in one workdir, as the strategies configs suggest: results.json kept only the last run's
  stages, and a typo's error listed those alone; any folder passed as a stage (an export written in the workdir was
  'not finished: finish it with finetune train')."""
  base = {"train": {"steps": 2, "log_every": 1, "checkpoint_every": 0}}
  for variant in ("b", "c"):
    train_lib.train_and_evaluate(tiny_config(**base, stages={"a": {}, variant: {"init_from": "stage:a"}}),
                                 str(tmp_path))
  assert list(json.load(open(tmp_path / "results.json"))) == ["a", "b", "c"]
  _assert_equals_its_final_evaluation(tmp_path / "b", evaluate_run(str(tmp_path), "b"))
  (tmp_path / "exported").mkdir()
  (tmp_path / "exported" / "config.json").write_text("{}")
  for stage in ("d", "exported"):
    with pytest.raises(FinetuneError, match=rf"--stage '{stage}': .* has no such stage; its stages: a, c, b"):
      evaluate_run(str(tmp_path), stage)
