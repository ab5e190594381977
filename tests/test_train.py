"""End-to-end runs: outputs and their schema, stages with init_from/dont_load, errors, non-finite loss."""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import warnings

import jax
import numpy as np
import optax
import pytest

from conftest import (REPO, killed_at_step, shared_data, stage_step_primitives, step_folders, tiny_config,
                      traced_primitives)
from finetune import train as train_lib
from finetune.checkpoint import read_checkpoint_arrays, resolve_checkpoint
from finetune.export import latest_checkpoint
from finetune.config import load_config
from finetune.errors import FinetuneError
from finetune.partition import flatten

TRAIN_KEYS = {"step", "split", "loss", "accuracy", "learning_rate", "grad_norm"}


def _records(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_main_config_smoke_run_writes_every_output(tmp_path):
  shared_data("mnist")
  config = load_config(str(REPO / "configs/mnist_transfer.py") + ":steps=6,target_steps=6,data_path=" +
                       str(REPO.parent / "shared/data/mnist"), ["train.log_every=3", "train.checkpoint_every=3"])
  summaries = train_lib.train_and_evaluate(config, str(tmp_path))
  assert list(summaries) == ["pretrain", "finetune", "scratch"]
  assert json.load(open(tmp_path / "config.json"))["stages"]["finetune"]["init_from"] == "stage:pretrain"
  for stage, classes in (("pretrain", ["0", "1", "2", "3", "4"]), ("finetune", ["5", "6", "7", "8", "9"]),
                         ("scratch", ["5", "6", "7", "8", "9"])):
    run_dir = tmp_path / stage
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["classes"] == classes and summary["steps"] == 6
    # The official test set, restricted to the stage's digits (5,139 test images are 0-4, 4,861 are 5-9).
    assert summary["final"]["test"]["num_examples"] == (5139 if stage == "pretrain" else 4861)
    # Scored on every one of those images: a count of right answers over that many.
    correct = summary["final"]["test"]["accuracy"] * summary["final"]["test"]["num_examples"]
    assert 0 <= round(correct) <= summary["final"]["test"]["num_examples"] and correct == pytest.approx(round(correct))
    records = _records(run_dir)
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [3, 6]
    for record in train_records:
      assert TRAIN_KEYS | {"examples_per_s"} <= set(record), record
    # The fine-tuned stage also re-evaluates its source task (forgetting); the from-scratch control has no source.
    forgetting = {"forgetting/pretrain/validation", "forgetting/pretrain/test"} if stage == "finetune" else set()
    assert {r["split"] for r in records} == {"train", "validation", "test"} | forgetting
    if stage == "finetune":
      drop = summary["forgetting"]["pretrain"]["test"]
      assert drop["before"] == json.load(open(tmp_path / "pretrain" / "summary.json"))["final"]["test"]["accuracy"]
    else:
      assert summary["forgetting"] == {}
    assert step_folders(run_dir / "checkpoints") == ["3", "6"]
  assert summaries["finetune"]["init"]["fresh"] == ["head/bias", "head/kernel"]
  assert list(summaries["scratch"]["init"]) == ["run_id", "classes", "examples"]  # its identity and data only
  assert summaries["finetune"]["init"]["source_run_id"] == summaries["pretrain"]["init"]["run_id"]


def test_a_loaded_head_must_score_the_classes_it_was_trained_on(tmp_path):
  """(A target stage that loaded its source's head onto other classes, or the same in another order, trained on
  a head whose rows meant other classes, silently.)"""
  from finetune.config import stage_configs  # pylint: disable=g-import-not-at-top
  config = tiny_config(stages={
      "source": {"data": {"classes": (0, 1, 2)}},
      "same": {"data": {"classes": (0, 1, 2)}, "init_from": "stage:source"},
      "reordered": {"data": {"classes": (2, 1, 0)}, "init_from": "stage:source"},
      "new_head": {"data": {"classes": (2, 1, 0)}, "init_from": "stage:source", "dont_load": ("^head/",)},
  })
  stages = dict(stage_configs(config))
  train_lib.run_stage(stages["source"], str(tmp_path / "source"), str(tmp_path), "source")
  for name in ("same", "new_head"):
    train_lib.initial_state(train_lib.build_stage(stages[name]), stages[name], str(tmp_path))
  with pytest.raises(FinetuneError, match=r"loads a classifier head trained on classes \['0', '1', '2'\] but this "
                                          r"stage's data has \['2', '1', '0'\] \(in label order\).*add '\^head/' to "
                                          r"config.dont_load"):
    train_lib.initial_state(train_lib.build_stage(stages["reordered"]), stages["reordered"], str(tmp_path))


@pytest.mark.parametrize("later,message", [
    ({"data": {"name": "mnist", "path": "no/such/mnist"}}, r"stage 'later': config.data.path 'no/such/mnist' does not "
                                                          r"exist"),
    ({"init_from": "no/such/run"}, r"stage 'later': config.init_from 'no/such/run' does not exist"),
    ({"peft": {"method": "lora", "targets": ("conv",), "load_adapter": "no/such/adapter"}},
     r"stage 'later': config.peft.load_adapter 'no/such/adapter' does not exist"),
], ids=["data", "init_from", "adapter"])
def test_a_later_stage_s_missing_files_are_refused_before_anything_trains(tmp_path, monkeypatch, later, message):
  """(Found only when that stage opened: after the earlier stages had trained, hours for a pretraining stage.)"""
  monkeypatch.chdir(tmp_path)
  config = tiny_config(stages={"first": {}, "later": later})
  with pytest.raises(FinetuneError, match=message):
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "first").exists()


def test_a_later_stage_may_start_from_what_an_earlier_one_makes_and_read_data_by_a_glob(tmp_path):
  """(The preflight refused an intermediate checkpoint of an earlier stage, which only exists once it has run, and
  a data path glob, which hf_files expands.)"""
  from finetune.config import stage_configs, with_values  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  config = tiny_config(train={"steps": 6, "checkpoint_every": 3}, stages={
      "first": {}, "later": {"init_from": str(run / "first" / "checkpoints" / "3")}})
  summaries = train_lib.train_and_evaluate(config, str(run))
  assert summaries["later"]["init"]["source"].endswith("first/checkpoints/3")
  (tmp_path / "a_train.csv").write_text("x,label\n")
  layout = [(name, with_values(cfg, data={"name": "hf_files", "path": str(tmp_path / pattern)}), str(tmp_path / name))
            for (name, cfg), pattern in zip(stage_configs(config), ("*.csv", "*.csv"))]
  train_lib.check_stage_inputs(layout, str(tmp_path / "elsewhere"))  # the glob matches a file
  layout[1] = (layout[1][0], with_values(layout[1][1], data={"path": str(tmp_path / "*.parquet")}), layout[1][2])
  with pytest.raises(FinetuneError, match=r"stage 'later': config.data.path '.*\*.parquet' does not exist"):
    train_lib.check_stage_inputs(layout, str(tmp_path / "elsewhere"))


def test_stage_initialises_from_earlier_stage_except_dont_load(tmp_path):
  config = tiny_config(stages={
      "source": {"data": {"classes": (0, 1, 2, 3, 4)}},
      "target": {"data": {"classes": (5, 6, 7)}, "init_from": "stage:source", "dont_load": ("^head/",)},
  })
  stages = dict(__import__("finetune.config", fromlist=["stage_configs"]).stage_configs(config))
  train_lib.run_stage(stages["source"], str(tmp_path / "source"), str(tmp_path), "source")
  source_params = read_checkpoint_arrays(resolve_checkpoint("stage:source", str(tmp_path)))["params"]
  stage = train_lib.build_stage(stages["target"])
  # Device bytes alive when the loaded parameters' optimizer state is made (recorded as its init is traced): the
  # random initial parameters and Adam state stayed alive beside the loaded ones (2.9x the state; now 1x).
  gc.collect()
  alive_before = {id(a) for a in jax.live_arrays()}
  live_at_init, optimizer = [], stage.optimizer

  def recording_optimizer(phase, lr_scale=None):
    tx, extra = optimizer(phase, lr_scale)

    def init(params):
      live_at_init.append(sum(a.nbytes for a in jax.live_arrays() if id(a) not in alive_before))
      return tx.init(params)
    return optax.GradientTransformation(init, tx.update), extra

  stage.optimizer = recording_optimizer
  state, report = train_lib.initial_state(stage, stages["target"], str(tmp_path))
  params_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.model_state)))
  assert live_at_init[-1] <= 1.2 * params_bytes, (live_at_init, params_bytes)  # (was 2.9x here)
  target_params = flatten(jax.device_get(state.params))
  assert report["fresh"] == ["head/bias", "head/kernel"]
  assert target_params["head/kernel"].shape == (16, 3)  # new head for 3 classes
  for path, value in target_params.items():
    if not path.startswith("head/"):
      np.testing.assert_array_equal(value, source_params[path])
  # BatchNorm statistics come along with the parameters.
  stats = flatten(jax.device_get(state.model_state))
  source_stats = read_checkpoint_arrays(resolve_checkpoint("stage:source", str(tmp_path)))["model_state"]
  np.testing.assert_array_equal(stats["stem/norm/mean"], source_stats["stem/norm/mean"])


def test_a_workdir_in_use_by_another_run_is_refused_before_anything_is_written(tmp_path):
  """(Two runs in one folder at once, a double launch or a requeued job beside the closing one, mixed their
  checkpoints, metrics and summary: one exited 0 with the other's config.json beside its weights.)"""
  from finetune import files  # pylint: disable=g-import-not-at-top
  config = tiny_config(train={"steps": 2, "log_every": 1, "checkpoint_every": 0})
  with files.exclusive_workdir(str(tmp_path)):  # another process's lock, as far as flock is concerned
    with pytest.raises(FinetuneError, match=rf"{tmp_path} is in use by another finetune process \(pid {os.getpid()} "
                                            r"on .*\): wait for it to end or stop it, or use another --workdir"):
      train_lib.train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".lock"]
  train_lib.train_and_evaluate(config, str(tmp_path))  # released when the first run ends
  assert (tmp_path / "summary.json").exists()


def test_a_run_inside_another_run_s_workdir_is_refused_whichever_starts_first(tmp_path):
  """(Only the workdir itself was locked: `--workdir W/finetune` beside a run in W trained into that run's stage
  folder.) A run inside a held workdir is refused at once; a stage folder another run holds is refused when the
  stage reaches it, its earlier stages kept."""
  from finetune import files  # pylint: disable=g-import-not-at-top
  single = tiny_config(train={"steps": 2, "checkpoint_every": 0})
  (tmp_path / "outer").mkdir()
  (tmp_path / "link").symlink_to(tmp_path / "outer")
  with files.exclusive_workdir(str(tmp_path / "outer")):  # another process's run in outer/, as flock sees it
    for inside in (tmp_path / "outer" / "finetune", tmp_path / "link" / "finetune"):  # a symlink into it too
      with pytest.raises(FinetuneError, match=rf"{inside} is inside {tmp_path}/outer, which another finetune process "
                                              r"holds \(pid \d+ on .*\): wait for it"):
        train_lib.train_and_evaluate(single, str(inside))
  assert not (tmp_path / "outer" / "finetune").exists()
  # Another program's held `.lock` above is not a finetune run's.
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / ".lock").write_text("held by some other tool")
  import fcntl  # pylint: disable=g-import-not-at-top
  with open(foreign / ".lock") as held:
    fcntl.flock(held, fcntl.LOCK_EX)
    train_lib.train_and_evaluate(single, str(foreign / "run"))
  assert (foreign / "run" / "summary.json").exists()
  staged = tiny_config(train={"steps": 2, "checkpoint_every": 0},
                       stages={"pretrain": {}, "finetune": {"init_from": "stage:pretrain"}})
  with files.exclusive_workdir(str(tmp_path / "run" / "finetune")):  # a run started there first
    with pytest.raises(FinetuneError, match=rf"{tmp_path}/run/finetune is in use by another finetune process "
                                            r"\(pid .*\): a run started inside stage 'finetune''s folder; wait for it "
                                            r"to end or stop it, then run this command again"):
      train_lib.train_and_evaluate(staged, str(tmp_path / "run"))
  assert (tmp_path / "run" / "pretrain" / "summary.json").exists()
  assert not (tmp_path / "run" / "finetune" / "summary.json").exists()
  train_lib.train_and_evaluate(staged, str(tmp_path / "run"))  # once it has ended, the run resumes at that stage
  assert (tmp_path / "run" / "finetune" / "summary.json").exists()


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
  """(Lustre mounted noflock and some network mounts answer flock with ENOLCK / EOPNOTSUPP: every run was refused
  as 'in use by another finetune process'.)"""
  import errno  # pylint: disable=g-import-not-at-top
  import fcntl  # pylint: disable=g-import-not-at-top

  def no_locks(fd, operation):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

  monkeypatch.setattr(fcntl, "flock", no_locks)
  with pytest.warns(UserWarning, match=r"the file system refuses locks .* nothing stops a second run"):
    summary = train_lib.train_and_evaluate(tiny_config(train={"steps": 2, "checkpoint_every": 0}), str(tmp_path))
  assert summary["train"]["steps"] == 2


@pytest.mark.parametrize("stopping", [{}, {"eval_every": 2, "early_stopping": {"metric": "validation/loss",
                                                                               "patience": 5, "mode": "min"}}],
                         ids=["plain", "early_stopping"])
def test_a_resumed_stage_reports_the_throughput_of_all_its_steps(stopping, tmp_path):
  """(A stage killed after its final checkpoint but before summary.json reported no training throughput when
  resumed, and one resumed elsewhere only its last attempt's; sweeps tabulating train_examples_per_s got blanks.
  Early stopping saves the final step itself.)"""
  config = tiny_config(train={"steps": 4, "log_every": 1, "checkpoint_every": 2, **stopping})
  first = train_lib.train_and_evaluate(config, str(tmp_path))["train"]["train_examples_per_s"]
  assert first and first > 0
  os.remove(tmp_path / "summary.json")  # as if killed between the final checkpoint and the summary
  assert train_lib.train_and_evaluate(config, str(tmp_path))["train"]["train_examples_per_s"] == first


def test_a_diverged_attempt_before_any_checkpoint_leaves_no_marker_for_the_next(tmp_path):
  """(A run that diverged before its first checkpoint may be re-run in the same workdir with a fixed config; its
  diverged.json then kept export/eval --unfinished off the new attempt's good checkpoints.)"""
  config = tiny_config(train={"steps": 4, "log_every": 1, "checkpoint_every": 2})
  (tmp_path / "diverged.json").write_text('{"weights_from_step": 1, "error": "loss is nan at step 2"}')
  stage_cfg = dict(__import__("finetune.config", fromlist=["stage_configs"]).stage_configs(config))["train"]
  opened = train_lib.open_stage(stage_cfg, str(tmp_path), str(tmp_path), "train")
  opened.close()
  assert not (tmp_path / "diverged.json").exists()


def test_a_resumable_run_without_a_readable_init_json_is_one_clear_error(tmp_path):
  """(A deleted init.json read "No such file or directory ...; check that path (--workdir, ...)"; one holding valid
  JSON that is not an object was a TypeError traceback.)"""
  config = tiny_config(train={"steps": 2, "log_every": 1, "checkpoint_every": 1})
  train_lib.train_and_evaluate(config, str(tmp_path))
  os.remove(tmp_path / "summary.json")  # unfinished again: the next run resumes from its checkpoints
  os.rename(tmp_path / "init.json", tmp_path / "init.json.saved")
  with pytest.raises(FinetuneError, match=r"init.json is missing, but the run has checkpoints: .*restore it, or "
                                          r"delete the run folder"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  (tmp_path / "init.json").write_text("[]")
  with pytest.raises(FinetuneError, match=r"init.json is damaged \(a JSON list, not the object this framework "
                                          r"writes\); restore it"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  os.replace(tmp_path / "init.json.saved", tmp_path / "init.json")
  # Resuming on data whose classes changed (edited label files, another reading of them) would renumber the
  # labels under the trained head silently: init.json records the classes the run started with.
  init = json.loads((tmp_path / "init.json").read_text())
  assert init["classes"] == [str(i) for i in range(10)]
  (tmp_path / "init.json").write_text(json.dumps({**init, "classes": ["1", "0", *init["classes"][2:]]}))
  with pytest.raises(FinetuneError, match=r"resumes on data whose classes are \['0', '1', .*, but it started with "
                                          r"\['1', '0', .*\(init.json\): the data changed since"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  # So are its splits' sizes (a source that now reads a dataset's own validation split where it carved one).
  assert set(init["examples"]) == {"train", "validation"}
  (tmp_path / "init.json").write_text(json.dumps({**init, "examples": {**init["examples"], "train": 1000}}))
  with pytest.raises(FinetuneError, match=rf"resumes on data whose splits hold train {init['examples']['train']} "
                                          r"examples \(started with 1000\) \(init.json\): the data, or how it is read, "
                                          r"changed since"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  (tmp_path / "init.json").write_text(json.dumps(init))
  assert train_lib.train_and_evaluate(config, str(tmp_path))["train"]["steps"] == 2


def test_init_from_shape_mismatch_names_parameter_and_shapes(tmp_path):
  train_lib.train_and_evaluate(tiny_config(train={"steps": 2}), str(tmp_path / "a"))
  config = tiny_config(model={"name": "cnn", "stem_width": 8, "widths": (8, 32)}, init_from=str(tmp_path / "a"))
  with pytest.raises(FinetuneError, match=r"shape mismatch for parameter 'head/kernel'.*\(16, 10\).*\(32, 10\)"):
    train_lib.train_and_evaluate(config, str(tmp_path / "b"))


def test_a_re_initialised_parameter_that_never_trains_is_refused(tmp_path):
  """(Accepted before: LoRA with dont_load=^head/ and no modules_to_save trained its adapters under a random,
  frozen classifier; a freeze rule over a dont_load pattern kept those layers random.)"""
  vit = {"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32}
  train_lib.train_and_evaluate(tiny_config(model=vit, train={"steps": 2}), str(tmp_path / "a"))
  source = dict(model=vit, init_from=str(tmp_path / "a"), train={"steps": 2})
  lora = {"method": "lora", "targets": ("query", "value"), "rank": 2}
  with pytest.raises(FinetuneError, match=r"2 parameter\(s\) that config.dont_load re-initialises are frozen in "
                                          r"every phase, so they would keep their random initial values: head/bias, "
                                          r"head/kernel. Train them \(list them in config.peft.modules_to_save"):
    train_lib.train_and_evaluate(tiny_config(**source, dont_load=("^head/",), peft=lora), str(tmp_path / "b"))
  with pytest.raises(FinetuneError, match=r"parameter\(s\) that config.dont_load re-initialises are frozen .* "
                                          r"blocks/0/.*\(drop the config.freeze rule that covers them"):
    train_lib.train_and_evaluate(tiny_config(**source, dont_load=("^blocks/0/", "^head/"),
                                             freeze={"patterns": ("^blocks/0/",)}), str(tmp_path / "c"))
  # Under PEFT too, when PEFT trains them and a freeze rule is what keeps them (modules_to_save names them already).
  with pytest.raises(FinetuneError, match=r"re-initialises are frozen .* head/bias\. Train them \(drop the "
                                          r"config.freeze rule that covers them"):
    train_lib.train_and_evaluate(tiny_config(**source, dont_load=("^head/",), freeze={"patterns": ("bias$",)},
                                             peft={**lora, "modules_to_save": ("^head/",)}), str(tmp_path / "e"))
  # Trained in a later phase (gradual unfreezing reaches the re-initialised block): accepted.
  train_lib.train_and_evaluate(tiny_config(**{**source, "train": {"steps": 8}}, dont_load=("^blocks/1/", "^head/"),
                                           unfreeze={"mode": "gradual", "every_steps": 1}), str(tmp_path / "d"))
  assert not os.path.exists(tmp_path / "b" / "summary.json") and os.path.exists(tmp_path / "d" / "summary.json")


def test_init_from_missing_parameter_and_unmatched_dont_load(tmp_path):
  train_lib.train_and_evaluate(tiny_config(train={"steps": 2}), str(tmp_path / "a"))
  with pytest.raises(FinetuneError, match=r"pattern '\^nothing/' matches no parameter"):
    train_lib.train_and_evaluate(tiny_config(init_from=str(tmp_path / "a"), dont_load=("^nothing/",)),
                                 str(tmp_path / "b"))
  with pytest.raises(FinetuneError, match=r"'layers/0/bias' is not in checkpoint"):
    train_lib.train_and_evaluate(tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (16,)},
                                             init_from=str(tmp_path / "a"), dont_load=("^head/",)),
                                 str(tmp_path / "c"))
  with pytest.raises(FinetuneError, match="does not exist"):
    train_lib.train_and_evaluate(tiny_config(init_from=str(tmp_path / "nope")), str(tmp_path / "d"))


def test_init_from_an_unfinished_run_is_refused_unless_a_step_folder_is_named(tmp_path):
  """(A run stopped at step 2 of 4, by a kill or a divergence, gave its latest checkpoint silently.)"""
  with killed_at_step(3), pytest.raises(KeyboardInterrupt):
    train_lib.train_and_evaluate(tiny_config(train={"steps": 4, "log_every": 1, "checkpoint_every": 2}),
                                 str(tmp_path / "a"))
  for source in (tmp_path / "a", tmp_path / "a" / "checkpoints"):
    with pytest.raises(FinetuneError, match=r"has not finished \(no summary.json in .*/a\).*a/checkpoints/2\)"):
      train_lib.train_and_evaluate(tiny_config(init_from=str(source)), str(tmp_path / "b"))
  summary = train_lib.train_and_evaluate(tiny_config(init_from=str(tmp_path / "a" / "checkpoints" / "2")),
                                         str(tmp_path / "c"))
  assert summary["train"]["init"]["loaded"] > 0


def test_completed_run_is_not_rerun(tmp_path):
  first = train_lib.train_and_evaluate(tiny_config(), str(tmp_path))
  mtime = os.path.getmtime(tmp_path / "summary.json")
  again = train_lib.train_and_evaluate(tiny_config(), str(tmp_path))
  assert again == json.loads(json.dumps(first)) and os.path.getmtime(tmp_path / "summary.json") == mtime


def test_training_and_evaluation_wait_once_more_than_a_few_steps_are_in_flight(tmp_path, monkeypatch):
  """XLA's CPU client hangs when many multi-device steps are queued unfinished; the loops wait on the step (or
  evaluation batch) MAX_STEPS_IN_FLIGHT back, not only at logging."""
  waited = []
  real = jax.block_until_ready

  def recording(tree):
    waited.append(tree)
    return real(tree)

  monkeypatch.setattr(train_lib.jax, "block_until_ready", recording)
  limit = train_lib.MAX_STEPS_IN_FLIGHT
  config = tiny_config(train={"steps": 12, "log_every": 12, "checkpoint_every": 0},
                       data={"eval_batch_size": 16})
  train_lib.train_and_evaluate(config, str(tmp_path))
  steps = [tree for tree in waited if isinstance(tree, dict) and "loss" in tree]
  assert len(steps) == 12 - limit and all(np.ndim(tree["loss"]) == 0 for tree in steps)
  eval_batches = -(-360 // 16)  # the validation split: 20% of the 1797 digits, rounded down
  sums = [tree for tree in waited if isinstance(tree, dict) and "loss_sum" in tree]
  assert len(sums) == eval_batches - limit, len(sums)


def test_checkpoint_arrays_the_model_has_no_place_for_are_reported(tmp_path, capsys):
  """(Layers beyond a shallower model's depth, say, were dropped without a word.)"""
  config = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (16, 16)},
                       stages={"deep": {}, "shallow": {"init_from": "stage:deep", "model": {"hidden": (16,)},
                                                       "dont_load": ("^head/",)}},
                       train={"steps": 2, "log_every": 2, "checkpoint_every": 0})
  summaries = train_lib.train_and_evaluate(config, str(tmp_path))
  unused = summaries["shallow"]["init"]["unused"]
  assert unused == ["layers/1/bias", "layers/1/kernel"]  # the second hidden layer
  assert f"{len(unused)} checkpoint array(s) have no place in this model and were not loaded" in capsys.readouterr().out
  assert "unused" not in summaries["deep"]["init"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  original = train_lib.InputPipeline.train_batch

  def poisoned(self, step):
    batch = original(self, step)
    if step >= 7:  # the 8th update sees NaN inputs
      batch["image"] = np.full_like(batch["image"], np.nan)
    return batch

  monkeypatch.setattr(train_lib.InputPipeline, "train_batch", poisoned)
  config = tiny_config(train={"steps": 12, "log_every": 1, "checkpoint_every": 3})
  with pytest.raises(FinetuneError, match=r"loss is nan at step 8.*last good checkpoint \(step 6\)"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert step_folders(tmp_path / "checkpoints") == ["3", "6"]
  restored = read_checkpoint_arrays(str(tmp_path / "checkpoints" / "6"))["params"]
  assert all(np.isfinite(v).all() for v in restored.values())
  monkeypatch.chdir(tmp_path)  # a relative step folder reads the same arrays
  relative = read_checkpoint_arrays(os.path.join("checkpoints", "6"))["params"]
  assert all(np.array_equal(relative[path], value) for path, value in restored.items())
  assert not (tmp_path / "summary.json").exists()
  checkpoint_before = tiny_config(train={"steps": 12, "log_every": 1, "checkpoint_every": 7})
  with pytest.raises(FinetuneError, match=r"loss is nan at step 8.*no good checkpoint.*\(step 7 holds the weights.*"
                                          r"Lower config.optimizer.learning_rate or set config.optimizer.grad_clip_"):
    train_lib.train_and_evaluate(checkpoint_before, str(tmp_path / "7"))
  # (Clipping was suggested where it was on already.)
  clipped = tiny_config(train={"steps": 12, "log_every": 1, "checkpoint_every": 7}, optimizer={"grad_clip_norm": 1.0})
  with pytest.raises(FinetuneError, match=r"Lower config.optimizer.learning_rate, in a new --workdir$"):
    train_lib.train_and_evaluate(clipped, str(tmp_path / "clipped"))


def test_keep_checkpoints_1_keeps_the_good_checkpoint_until_the_next_one_is_checked(tmp_path, monkeypatch):
  """(With keep_checkpoints=1, saving step 6 removed step 3, and the loss of step 7, the first to see step 6's
  weights, was NaN: no good checkpoint was left.) The newest checkpoint counts only once it is checked: during
  training one more is kept, and a finished stage keeps `keep_checkpoints`."""
  original = train_lib.InputPipeline.train_batch

  def poisoned(self, step):
    batch = original(self, step)
    if step >= 6:  # the 7th update sees NaN inputs: checkpoint 6 holds the weights that gave its loss
      batch["image"] = np.full_like(batch["image"], np.nan)
    return batch

  monkeypatch.setattr(train_lib.InputPipeline, "train_batch", poisoned)
  config = tiny_config(train={"steps": 12, "log_every": 1, "checkpoint_every": 3, "keep_checkpoints": 1})
  with pytest.raises(FinetuneError, match=r"loss is nan at step 7; training stopped and the last good checkpoint "
                                          r"\(step 3\) .* is intact \(step 6 holds the weights that gave this loss\)"):
    train_lib.train_and_evaluate(config, str(tmp_path / "diverged"))
  assert step_folders(tmp_path / "diverged" / "checkpoints") == ["3", "6"]
  # export/eval --unfinished take the last good checkpoint, not step 6 (a model was exported from its weights)
  from finetune.export import latest_checkpoint  # pylint: disable=g-import-not-at-top
  assert latest_checkpoint(str(tmp_path / "diverged"), "export") == str(tmp_path / "diverged" / "checkpoints" / "3")
  # ... and init_from it names that checkpoint (it suggested step 6, whose weights gave the nan loss)
  from finetune.checkpoint import resolve_checkpoint  # pylint: disable=g-import-not-at-top
  with pytest.raises(FinetuneError, match=r"that run stopped on diverged weights from step 6 .*diverged.json\); "
                                          r"train it again with the fix that file names, or name its last good "
                                          r"checkpoint \(.*/diverged/checkpoints/3\)"):
    resolve_checkpoint(str(tmp_path / "diverged"), str(tmp_path))
  (tmp_path / "diverged" / "diverged.json").write_text("{}")  # (damaged: a KeyError traceback)
  for read in (lambda: resolve_checkpoint(str(tmp_path / "diverged"), str(tmp_path)),
               lambda: latest_checkpoint(str(tmp_path / "diverged"), "export")):  # (export's was a KeyError too)
    with pytest.raises(FinetuneError, match=r"diverged.json is damaged \(no weights_from_step\), so .*: train that "
                                            r"run again"):
      read()
  monkeypatch.setattr(train_lib.InputPipeline, "train_batch", original)
  train_lib.train_and_evaluate(config, str(tmp_path / "finished"))
  assert step_folders(tmp_path / "finished" / "checkpoints") == ["12"]


def test_weights_that_diverge_in_the_last_update_do_not_finish_the_stage(tmp_path):
  """No training loss sees the weights after the last update; the final evaluation does, and must refuse them."""
  config = tiny_config(train={"steps": 1, "log_every": 1, "checkpoint_every": 0},
                       optimizer={"learning_rate": 1e9, "warmup_steps": 0, "grad_clip_norm": 0.0,
                                  "schedule": "constant"})
  with pytest.raises(FinetuneError, match=r"validation loss is nan at step 1: the weights diverged.*new --workdir"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert math.isfinite(_records(tmp_path)[0]["loss"])  # the premise: the one training loss was finite
  assert not (tmp_path / "summary.json").exists()
  from finetune.export import latest_checkpoint  # pylint: disable=g-import-not-at-top
  assert step_folders(tmp_path / "checkpoints") == ["1"]  # the diverged weights, kept, and refused by --unfinished
  with pytest.raises(FinetuneError, match=r"stopped on diverged weights .*diverged.json\) and has no checkpoint "
                                          r"before step 1; train it again with the fix that file names"):
    latest_checkpoint(str(tmp_path), "export")


def test_rerun_with_a_different_config_is_refused(tmp_path):
  train_lib.train_and_evaluate(tiny_config(train={"steps": 2}), str(tmp_path))
  with pytest.raises(FinetuneError, match=r"holds a run whose config differs \(optimizer.learning_rate: 0.003 then, "
                                          r"0.1 now\); use a new --workdir"):
    train_lib.train_and_evaluate(tiny_config(train={"steps": 2}, optimizer={"learning_rate": 0.1}), str(tmp_path))
  # Logging cadence and wandb do not change what is computed: those may differ on resumption.
  train_lib.train_and_evaluate(tiny_config(train={"steps": 2, "log_every": 1}), str(tmp_path))
  train_lib.train_and_evaluate(tiny_config(train={"steps": 2, "eval_every": 1}), str(tmp_path))
  # ...except the evaluation cadence of a run that stops early: it decides where the run ends.
  stopping = {"steps": 4, "eval_every": 2, "early_stopping": {"metric": "validation/loss", "patience": 1,
                                                                 "mode": "min"}}
  train_lib.train_and_evaluate(tiny_config(train=stopping), str(tmp_path / "stops"))
  with pytest.raises(FinetuneError, match=r"config differs \(train.eval_every: 2 then, 1 now\)"):
    train_lib.train_and_evaluate(tiny_config(train={**stopping, "eval_every": 1}), str(tmp_path / "stops"))


def test_restart_before_first_checkpoint_leaves_no_duplicate_records(tmp_path, monkeypatch):
  original = train_lib.InputPipeline.train_batch

  def interrupt_at_5(self, step):
    if step == 5:
      raise KeyboardInterrupt
    return original(self, step)

  config = tiny_config(train={"steps": 8, "log_every": 1, "checkpoint_every": 0})
  monkeypatch.setattr(train_lib.InputPipeline, "train_batch", interrupt_at_5)
  with pytest.raises(KeyboardInterrupt):
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4, 5]
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "spl')  # a line cut short by the crash
  monkeypatch.setattr(train_lib.InputPipeline, "train_batch", original)
  train_lib.train_and_evaluate(config, str(tmp_path))
  steps = [(r["step"], r["split"]) for r in _records(tmp_path)]
  assert steps == [(s, "train") for s in range(1, 9)] + [(8, "validation")]


def test_refused_rerun_leaves_saved_configs_alone(tmp_path):
  stages = {"a": {"train": {"steps": 2}}, "b": {"init_from": "stage:a", "train": {"steps": 2}}}
  train_lib.train_and_evaluate(tiny_config(stages=stages), str(tmp_path))
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(FinetuneError, match="holds a run whose config differs"):
    train_lib.train_and_evaluate(tiny_config(stages=stages, optimizer={"learning_rate": 0.5}), str(tmp_path))
  assert (tmp_path / "config.json").read_text() == before


def test_a_stage_whose_source_was_retrained_is_refused(tmp_path):
  """A finished later stage is not reused after the stage (or run) it started from was trained again: its weights
  came from the old source. Refused before anything trains, naming the stage to delete."""
  import shutil  # pylint: disable=g-import-not-at-top
  stages = {"a": {"train": {"steps": 2}}, "b": {"init_from": "stage:a", "train": {"steps": 2}}}
  train_lib.train_and_evaluate(tiny_config(stages=stages), str(tmp_path / "w"))
  train_lib.train_and_evaluate(tiny_config(stages=stages), str(tmp_path / "w"))  # unchanged: reused as it is
  shutil.rmtree(tmp_path / "w" / "a")
  with pytest.raises(FinetuneError, match=r"stage 'b' .* was trained from an earlier run of stage:a, which has since "
                                          r"been retrained or deleted; delete .*/w/b to train it again"):
    train_lib.train_and_evaluate(tiny_config(stages=stages), str(tmp_path / "w"))
  assert not (tmp_path / "w" / "a").exists()  # refused before retraining a
  shutil.rmtree(tmp_path / "w" / "b")
  train_lib.train_and_evaluate(tiny_config(stages=stages), str(tmp_path / "w"))
  # A source in another workdir, retrained: noticed when the stage opens.
  train_lib.train_and_evaluate(tiny_config(init_from=str(tmp_path / "w" / "a"), train={"steps": 2}),
                               str(tmp_path / "other"))
  shutil.rmtree(tmp_path / "w" / "a")
  train_lib.train_and_evaluate(tiny_config(stages={"a": stages["a"]}), str(tmp_path / "w"))
  with pytest.raises(FinetuneError, match="was trained from an earlier run of"):
    train_lib.train_and_evaluate(tiny_config(init_from=str(tmp_path / "w" / "a"), train={"steps": 2}),
                                 str(tmp_path / "other"))


def test_a_workdir_holding_the_other_layout_or_a_damaged_file_is_refused(tmp_path):
  single = tiny_config(train={"steps": 2})
  stages = tiny_config(stages={"a": {"train": {"steps": 2}}, "b": {"init_from": "stage:a", "train": {"steps": 2}}})
  train_lib.train_and_evaluate(single, str(tmp_path / "single"))
  train_lib.train_and_evaluate(stages, str(tmp_path / "multi"))
  written = {p: p.read_text() for p in tmp_path.glob("*/*.json")}
  with pytest.raises(FinetuneError, match=r"holds a single-stage run and this config has stages \(a, b\); use a new"):
    train_lib.train_and_evaluate(stages, str(tmp_path / "single"))
  with pytest.raises(FinetuneError, match=r"holds a multi-stage run \(stages a, b\) and this config has one stage"):
    train_lib.train_and_evaluate(single, str(tmp_path / "multi"))
  assert {p: p.read_text() for p in tmp_path.glob("*/*.json")} == written and not (tmp_path / "single" / "a").exists()
  (tmp_path / "single" / "summary.json").write_text('{"final": ')  # cut short (a disk filled up, say)
  with pytest.raises(FinetuneError, match=r"single/summary.json is damaged \(not valid JSON"):
    train_lib.train_and_evaluate(single, str(tmp_path / "single"))


def test_validation_examples_do_not_depend_on_the_class_subset():
  from finetune.data.pipeline import build_pipeline  # pylint: disable=g-import-not-at-top
  everything = tiny_config().data
  subset = tiny_config(data={"classes": (5, 6, 7, 8, 9)}).data
  def images(split):
    return {tuple(x.ravel()) for x in split.take(np.arange(len(split)))["image"]}
  full, part = build_pipeline(everything, 0), build_pipeline(subset, 0)
  assert images(part.eval_splits["validation"]) <= images(full.eval_splits["validation"])
  assert not images(part.eval_splits["validation"]) & images(full.train)


def test_a_new_framework_key_at_its_default_does_not_block_resumption(tmp_path):
  train_lib.train_and_evaluate(tiny_config(train={"steps": 2}), str(tmp_path))
  saved = json.load(open(tmp_path / "config.json"))
  del saved["task"]  # as written by a version of finetune before the key existed
  (tmp_path / "config.json").write_text(json.dumps(saved))
  train_lib.train_and_evaluate(tiny_config(train={"steps": 2}), str(tmp_path))  # no refusal


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
  """k micro-batches inside the step give the update of the whole batch (an MLP: no BatchNorm, no dropout)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from finetune.checkpoint import read_checkpoint_arrays  # pylint: disable=g-import-not-at-top
  results = {}
  for accumulate in (1, 4):
    config = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (32,)},
                         train={"steps": 5, "log_every": 1, "checkpoint_every": 0, "grad_accum_steps": accumulate})
    train_lib.train_and_evaluate(config, str(tmp_path / str(accumulate)))
    results[accumulate] = (read_checkpoint_arrays(str(tmp_path / str(accumulate) / "checkpoints" / "5"))["params"],
                           _records(tmp_path / str(accumulate)))
    # The step does split the batch: a scan over `accumulate` micro-batches (none without accumulation).
    scans = [params["length"] for name, params in stage_step_primitives(train_lib.build_stage(config))
             if name == "scan"]
    assert scans == ([] if accumulate == 1 else [accumulate]), scans
  (big, big_records), (small, small_records) = results[1], results[4]
  for path in big:
    np.testing.assert_allclose(small[path], big[path], rtol=1e-5, atol=1e-6)
  assert big_records and len(big_records) == len(small_records)
  for a, b in zip(big_records, small_records):
    assert (a["step"], a["split"]) == (b["step"], b["split"])
    if a["split"] == "train":
      assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_gradient_accumulation_is_exact_when_micro_batches_count_different_numbers_of_tokens():
  """Causal LM with padding: rows 1-3 predict 2 tokens, row 0 15, so the micro-batches count 17 and 4 tokens
  (however the rows are split). Means are over the whole batch's tokens, so the update is the whole batch's
  (before, each micro-batch's mean counted equally: a parameter moved 0.48 further with SGD at learning rate 1)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from finetune.step import make_train_step  # pylint: disable=g-import-not-at-top
  config = tiny_config(
      task="causal_lm", model={"name": "gpt2", "vocab_size": 64, "n_positions": 16, "n_embd": 16, "n_layer": 1,
                               "n_head": 2, "dropout": 0.0},
      data={"name": "synthetic", "batch_size": 4, "eval_batch_size": 4, "validation_fraction": 0.0,
            "eval_splits": ("test",),
            "options": {"kind": "tokens", "length": 16, "vocab_size": 64, "num_examples": 16}},
      optimizer={"name": "sgd", "learning_rate": 1.0, "warmup_steps": 0, "schedule": "constant", "momentum": 0.0})
  stage = train_lib.build_stage(config)
  state = stage.init_state(0)(jax.random.PRNGKey(0))
  mask = np.ones((4, 16), np.int32)
  mask[1:, 3:] = 0  # rows 1-3: 3 tokens, 2 predicted
  batch = {"input_ids": jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 16)), jnp.int32),
           "attention_mask": jnp.asarray(mask), "label": jnp.zeros(4, jnp.int32)}
  tx, lr = stage.optimizer(0)
  results = {}
  for accumulate in (1, 2):
    step = make_train_step(stage.graphdef, tx, lr, stage.strategy.trainable(0), task="causal_lm",
                           accumulate=accumulate)
    new_state, metrics = jax.jit(step)(state, batch)
    results[accumulate] = (flatten(jax.device_get(new_state.params)), float(metrics["loss"]))
    scans = [params["length"] for name, params in traced_primitives(step, state, batch) if name == "scan"]
    assert scans == ([] if accumulate == 1 else [accumulate]), scans  # the step does split the batch
  assert results[2][1] == pytest.approx(results[1][1], rel=1e-6)
  for path, value in results[1][0].items():
    np.testing.assert_allclose(results[2][0][path], value, atol=1e-6, err_msg=path)


@pytest.mark.parametrize("model", [None, {"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 2,
                                          "num_heads": 2, "mlp_dim": 32}])
def test_bfloat16_compute_stays_close_to_float32(model, tmp_path):
  """Mixed precision: bfloat16 forward/backward, float32 master weights, optimizer state and statistics. Over 12
  steps the training losses stay within 3% of the float32 run's (measured on the CNN: 0.035% at most)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from finetune.checkpoint import read_checkpoint_arrays  # pylint: disable=g-import-not-at-top
  runs = {}
  for dtype in ("float32", "bfloat16"):
    sections = {"train": {"steps": 12, "log_every": 2, "checkpoint_every": 0, "compute_dtype": dtype}}
    if model:
      sections["model"] = model
    summary = train_lib.train_and_evaluate(tiny_config(**sections), str(tmp_path / dtype))["train"]
    arrays = read_checkpoint_arrays(str(tmp_path / dtype / "checkpoints" / "12"))
    runs[dtype] = ([r["loss"] for r in _records(tmp_path / dtype) if r["split"] == "train"], arrays, summary)
  (f32_losses, f32_arrays, _), (bf16_losses, bf16_arrays, bf16_summary) = runs["float32"], runs["bfloat16"]
  assert bf16_losses != f32_losses  # the option reached the run (bfloat16 rounds differently)
  np.testing.assert_allclose(bf16_losses, f32_losses, rtol=0.03)
  for collection in ("params", "model_state"):
    for path, value in bf16_arrays[collection].items():
      assert value.dtype == f32_arrays[collection][path].dtype == np.float32, path
  assert bf16_summary["final"]["validation"]["loss"] == pytest.approx(
      runs["float32"][2]["final"]["validation"]["loss"], rel=0.05)


@pytest.mark.parametrize("model", [None, {"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 2,
                                          "num_heads": 2, "mlp_dim": 32, "dropout": 0.1}])
@pytest.mark.parametrize("policy", ["block", "dots"])
def test_rematerialised_blocks_compute_the_same_run(model, policy, tmp_path):
  """Remat changes what is stored for the backward pass, not the result: same losses and parameters (BatchNorm
  statistics and dropout included)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from finetune.checkpoint import read_checkpoint_arrays  # pylint: disable=g-import-not-at-top
  runs = {}
  for remat in ("", policy):
    sections = {"train": {"steps": 6, "log_every": 2, "checkpoint_every": 0, "remat": remat}}
    if model:
      sections["model"] = model
    train_lib.train_and_evaluate(tiny_config(**sections), str(tmp_path / (remat or "off")))
    runs[remat] = (read_checkpoint_arrays(str(tmp_path / (remat or "off") / "checkpoints" / "6")),
                   [r["loss"] for r in _records(tmp_path / (remat or "off")) if r["split"] == "train"])
    # The blocks are rematerialised (jax.checkpoint's remat primitive in the step) only when asked for.
    rematerialised = [name for name, _ in stage_step_primitives(train_lib.build_stage(tiny_config(**sections)))
                      if "remat" in name]
    assert bool(rematerialised) == bool(remat), (remat, rematerialised)
  (plain, plain_losses), (remat, remat_losses) = runs[""], runs[policy]
  np.testing.assert_allclose(remat_losses, plain_losses, rtol=1e-5)
  for collection in ("params", "model_state"):
    for path, value in plain[collection].items():
      # Attention key biases have a zero true gradient (softmax ignores a per-query constant): Adam turns the
      # recomputation's float noise in that gradient into moves of up to ~lr/10 per step, so only their size is
      # comparable (jax 0.10.2: 4e-5 apart after 6 steps at lr 3e-3).
      atol = 3e-4 if path.endswith("key/bias") else 3e-5
      np.testing.assert_allclose(remat[collection][path], value, rtol=1e-5, atol=atol, err_msg=path)


def test_float32_params_stay_float32_under_bfloat16_compute():
  """train.float32_params: matching parameters enter the bfloat16 forward pass in float32; a regex matching no
  parameter is an error."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from finetune.errors import FinetuneError  # pylint: disable=g-import-not-at-top
  from finetune.step import to_compute_dtype  # pylint: disable=g-import-not-at-top
  tree = {"blocks": {"0": {"norm": {"scale": jnp.ones(3)}, "dense": {"kernel": jnp.ones((3, 3))}}},
          "ids": jnp.ones(3, jnp.int32)}
  cast = to_compute_dtype(tree, "bfloat16", (r"/norm/",))
  assert cast["blocks"]["0"]["norm"]["scale"].dtype == jnp.float32
  assert cast["blocks"]["0"]["dense"]["kernel"].dtype == jnp.bfloat16
  assert cast["ids"].dtype == jnp.int32
  assert to_compute_dtype(tree, "bfloat16")["blocks"]["0"]["norm"]["scale"].dtype == jnp.bfloat16
  vit = {"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32}

  def bfloat16_casts(float32_params):  # in the traced train step, the stage's own wiring of the option
    stage = train_lib.build_stage(tiny_config(model=vit, train={"compute_dtype": "bfloat16",
                                                                "float32_params": float32_params}))
    batch = train_lib.abstract_batch(stage.pipeline.train_batch(0), stage.mesh)
    return str(jax.make_jaxpr(stage.step_fn(0))(stage.abstract_state(0), batch)).count("new_dtype=bfloat16")

  # ViT's 10 norm parameters are no longer cast (and the norms they feed compute in float32: more than 10 fewer).
  assert bfloat16_casts([]) - bfloat16_casts(["norm"]) >= 10
  with pytest.raises(FinetuneError, match="config.train.float32_params: pattern 'layernorm' matches no parameter"):
    train_lib.build_stage(tiny_config(model=vit, train={"compute_dtype": "bfloat16", "float32_params": ["layernorm"]}))
  # Patterns are written in unrolled paths, scanned or not (they were matched against the stored ones, so
  # `blocks/0/` failed once scanned and `blocks/norm` matched only then); a stack is kept whole or not at all.
  def kept(float32_params, scan):
    return train_lib.build_stage(tiny_config(model=vit, train={"compute_dtype": "bfloat16", "scan_layers": scan,
                                                               "float32_params": float32_params})).keep_float32
  norms = r"blocks/\d+/attention_norm/"
  assert kept([norms], True) == (r"^blocks/attention_norm/bias$", r"^blocks/attention_norm/scale$")
  assert kept([norms], False) == tuple(f"^blocks/{i}/attention_norm/{name}$" for i in range(2)
                                       for name in ("bias", "scale"))
  assert bfloat16_casts([norms]) < bfloat16_casts([])
  with pytest.raises(FinetuneError, match=r"float32_params keeps some layers of blocks/attention_norm/bias in float32 "
                                          r"and not others; scanned layers .* are cast as one stack"):
    kept(["blocks/0/attention_norm/"], True)


def test_evaluation_adds_batches_in_float64_past_float32_counts():
  """A float32 running total of the batches' sums on the device stopped counting at 2^24 (2^24 + 1 == 2^24):
  language models' evaluation sets have more tokens than that. Sums are added on the host in float64."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top
  from finetune.sharding import make_mesh  # pylint: disable=g-import-not-at-top

  class Batches:  # what evaluate reads of an InputPipeline
    def eval_batches(self, split):
      for _ in range(8):
        yield {"mask": np.ones(1, np.float32)}

  counts = iter([2.0 ** 24] + [1.0] * 7)

  def eval_fn(weights, batch):
    count = jnp.float32(next(counts))
    return {"loss_sum": 2 * count, "correct": count, "count": count, "examples": jnp.sum(batch["mask"]),
            "tokens": count}

  metrics = train_lib.evaluate(eval_fn, {}, Batches(), "test", make_mesh(ConfigDict({"data": 1})))
  assert metrics["num_tokens"] == 2 ** 24 + 7 and metrics["num_examples"] == 8
  assert metrics["loss"] == 2.0 and metrics["accuracy"] == 1.0


def test_the_interval_timer_leaves_pauses_out_and_keeps_the_steps_before_them(monkeypatch):
  """(The clock was reset after an evaluation or a phase's compilation, so the steps run before it counted no time:
  evaluating every step reported 15 times the throughput.)"""
  clock = iter([0.0, 3.0, 10.0, 12.0, 20.0, 20.0, 20.0, 25.0])
  monkeypatch.setattr(train_lib.time, "perf_counter", lambda: next(clock))
  timer = train_lib.IntervalTimer()  # t=0
  pending = [jax.numpy.zeros(())]
  timer.pause(pending)  # t=3: 3 s of steps, then an evaluation
  timer.resume()  # t=10
  assert timer.lap() == 5.0  # t=12: 3 + 2 s of steps, the 7 s pause left out
  timer.pause([])  # nothing pending (just logged): nothing to time, the clock is not read
  timer.resume()  # t=20
  timer.pause(pending)  # t=20
  timer.resume()  # t=20
  assert timer.lap() == 5.0  # t=25


def test_a_task_or_model_reading_entries_the_data_lacks_is_one_error():
  """(config.task='causal_lm' on images was a KeyError deep inside tracing the train step.)"""
  with pytest.raises(FinetuneError, match=r"config.task='causal_lm' reads batch entries input_ids, attention_mask, "
                                          r"but data source 'digits' gives image, label"):
    train_lib.build_stage(tiny_config(task="causal_lm"))
  with pytest.raises(FinetuneError, match=r"model 'gpt2' reads batch entries input_ids, attention_mask, but data "
                                          r"source 'digits' gives image, label"):
    train_lib.build_stage(tiny_config(model={"name": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}))


def _cycled(warmup_steps: int):
  config = tiny_config(train={"steps": 12}, optimizer={"warmup_steps": warmup_steps},
                       unfreeze={"mode": "gradual", "every_steps": 3, "schedule": "cycle"})
  stage = train_lib.build_stage(config)
  return stage.cfg, stage.total_steps, stage.strategy


def test_a_warm_up_as_long_as_the_stage_is_reported_in_steps_and_in_epochs(tmp_path):
  """(warmup_steps >= the stage's steps was taken silently: the learning rate never reached its peak.)"""
  short = {"log_every": 2, "checkpoint_every": 0}
  with pytest.warns(UserWarning, match=r"warmup_steps=4 is not below the stage's length \(config.train.steps=4\)"):
    train_lib.train_and_evaluate(tiny_config(train={**short, "steps": 4}, optimizer={"warmup_steps": 4}),
                                 str(tmp_path / "steps"))
  # unfreeze.schedule='cycle' warms up in every phase: the shortest phase is the length that matters.
  with pytest.warns(UserWarning, match=r"warmup_steps=3 is not below the shortest unfreezing phase \(3 steps\)"):
    train_lib.warn_if_warmup_outlasts(*_cycled(warmup_steps=3))
  shorter = _cycled(warmup_steps=2)
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    train_lib.warn_if_warmup_outlasts(*shorter)
  # digits: 1797 images, 20% held out for validation -> 1437 training rows, 44 batches of 32 per epoch
  with pytest.warns(UserWarning, match=r"config.train.epochs=0.1: 5 steps"):
    train_lib.train_and_evaluate(tiny_config(train={**short, "steps": 0, "epochs": 0.1},
                                             optimizer={"warmup_steps": 40}), str(tmp_path / "epochs"))
  # Not for an earlier task rebuilt to evaluate forgetting: 0.5 epochs of its 3 classes (431 rows) are 7 steps, but
  # this stage trains 0.5 epochs of 10 classes, 22 steps.
  train_lib.train_and_evaluate(tiny_config(train={**short, "steps": 4}, data={"classes": (0, 1, 2)}),
                               str(tmp_path / "three_classes"))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    train_lib.train_and_evaluate(tiny_config(train={**short, "steps": 0, "epochs": 0.5}, optimizer={"warmup_steps": 10},
                                             init_from=str(tmp_path / "three_classes"), dont_load=("^head/",)),
                                 str(tmp_path / "below"))
  assert json.loads((tmp_path / "below" / "summary.json").read_text())["forgetting"]
  assert not [w for w in caught if "warmup_steps" in str(w.message)]


def test_logged_throughput_leaves_out_checkpoint_saves(tmp_path, monkeypatch):
  """A clock that advances one second per step and 100 per checkpoint save: every interval's 4 steps took 4 s."""
  import types  # pylint: disable=g-import-not-at-top
  from finetune import checkpoint  # pylint: disable=g-import-not-at-top
  clock = [0.0]
  real_pace, real_save = train_lib.pace, checkpoint.Checkpointer.save

  def pace_and_tick(pending):
    clock[0] += 1.0
    return real_pace(pending)

  def slow_save(self, *args, **kwargs):
    clock[0] += 100.0
    return real_save(self, *args, **kwargs)

  monkeypatch.setattr(train_lib, "pace", pace_and_tick)
  monkeypatch.setattr(checkpoint.Checkpointer, "save", slow_save)
  monkeypatch.setattr(train_lib, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
  config = tiny_config(train={"steps": 12, "log_every": 4, "checkpoint_every": 4})
  train_lib.train_and_evaluate(config, str(tmp_path))
  rates = [json.loads(l)["examples_per_s"] for l in open(tmp_path / "metrics.jsonl") if '"train"' in l]
  assert rates == pytest.approx([config.data.batch_size] * 3)


@pytest.mark.parametrize("regularized", [False, True])
def test_a_stage_resumes_after_its_source_pruned_the_step_folder_it_started_from(regularized, tmp_path, capsys):
  """(A stage re-read its init_from source on every start to evaluate forgetting: once that run had pruned the step
  folder, the stage could not resume, with an error about a mistyped init_from.)"""
  source = tiny_config(train={"steps": 20, "log_every": 1, "checkpoint_every": 5, "keep_checkpoints": 1})
  with killed_at_step(12), pytest.raises(KeyboardInterrupt):
    train_lib.train_and_evaluate(source, str(tmp_path / "source"))
  regularize = {"l2sp": {"alpha": 0.1}} if regularized else {}
  target = tiny_config(train={"steps": 12, "log_every": 1, "checkpoint_every": 5},
                       init_from=str(tmp_path / "source" / "checkpoints" / "10"), dont_load=("^head/",),
                       regularize=regularize)
  with killed_at_step(8), pytest.raises(KeyboardInterrupt):
    train_lib.train_and_evaluate(target, str(tmp_path / "target"))
  train_lib.train_and_evaluate(source, str(tmp_path / "source"))  # finishes, keeping only its last checkpoint
  assert not (tmp_path / "source" / "checkpoints" / "10").exists()
  capsys.readouterr()
  if regularized:
    with pytest.raises(FinetuneError, match="stage 'train' resumes from its own checkpoint, but its regularizers "
                                            r"\(l2sp\) need the weights it started from"):
      train_lib.train_and_evaluate(target, str(tmp_path / "target"))
  else:
    summaries = train_lib.train_and_evaluate(target, str(tmp_path / "target"))
    assert summaries["train"]["steps"] == 12 and not summaries["train"].get("forgetting")
    assert "[train] resuming without evaluating the sources it started from" in capsys.readouterr().err



def test_a_fresh_stage_whose_sources_cannot_be_read_fails_with_their_error(tmp_path, monkeypatch):
  """(Only a resumed stage may go on without them: the check read `start`, which a fresh start had set to 0.)"""
  from finetune import regularizers  # pylint: disable=g-import-not-at-top
  train_lib.train_and_evaluate(tiny_config(train={"steps": 4, "log_every": 2}), str(tmp_path / "source"))

  def unreadable(*args, **kwargs):
    raise FinetuneError("the source's config.json is damaged")

  monkeypatch.setattr(regularizers, "lineage", unreadable)
  for regularize in ({}, {"l2sp": {"alpha": 0.1}}):
    target = tiny_config(train={"steps": 4, "log_every": 2}, init_from=str(tmp_path / "source"),
                         dont_load=("^head/",), regularize=regularize)
    with pytest.raises(FinetuneError, match="^the source's config.json is damaged$"):
      train_lib.train_and_evaluate(target, str(tmp_path / f"target{len(regularize)}"))



@pytest.mark.parametrize("task, model, message", [
    ("classification", {"name": "gpt2", "vocab_size": 64, "n_positions": 32, "n_embd": 16, "n_layer": 1, "n_head": 2},
     r"model outputs shape \(8, 16, 64\), a prediction per token: a language model needs config.task='causal_lm'"),
    ("causal_lm", {"name": "bert", "vocab_size": 64, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                   "intermediate_size": 32, "max_position_embeddings": 32},
     r"model outputs shape \(8, 3\), one row per example: a classifier needs config.task='classification'"),
])
def test_a_task_the_model_does_not_output_for_is_one_clear_error(task, model, message):
  """(A language model under the default task='classification', or BERT under 'causal_lm', failed while the
  step compiled with jax's 'Incompatible shapes for broadcasting'.)"""
  from finetune.config import build_config  # pylint: disable=g-import-not-at-top
  config = build_config({"task": task, "model": model, "data": {
      "name": "synthetic", "batch_size": 8, "eval_batch_size": 8, "validation_fraction": 0.0, "eval_splits": ("test",),
      "options": {"kind": "tokens", "length": 16, "vocab_size": 64, "num_classes": 3, "num_examples": 16}},
      "train": {"steps": 1}})
  with pytest.raises(FinetuneError, match=message):
    train_lib.build_stage(config).train_step(0)


def test_a_damaged_timing_file_costs_a_resume_only_the_earlier_attempts_time(tmp_path, capsys):
  """(It refused the resume and said to delete the run folder, checkpoints and all.)"""
  config = tiny_config(train={"steps": 12, "log_every": 6, "checkpoint_every": 6})
  train_lib.train_and_evaluate(config, str(tmp_path))
  shutil.rmtree(tmp_path / "checkpoints" / "12")  # as if stopped after step 6
  (tmp_path / "summary.json").unlink()
  (tmp_path / "timing.json").write_text('{"6": {"seconds": 1.0, "ste')
  capsys.readouterr()
  train_lib.train_and_evaluate(config, str(tmp_path))
  assert "timing.json is damaged; the throughput leaves out" in capsys.readouterr().err
  assert json.load(open(tmp_path / "summary.json"))["steps"] == 12
  assert set(json.load(open(tmp_path / "timing.json"))) == {"12"}


def test_a_resume_that_trains_past_a_divergence_drops_its_marker_at_the_next_checkpoint(tmp_path):
  """(An attempt resumed on another mesh got past the step that diverged before, was stopped again, and kept the
  marker: `export --unfinished` took the checkpoint before it, not the newer good ones.)"""
  config = tiny_config(train={"steps": 12, "log_every": 2, "checkpoint_every": 4, "keep_checkpoints": 3})
  train_lib.train_and_evaluate(config, str(tmp_path))
  for step in ("8", "12"):
    shutil.rmtree(tmp_path / "checkpoints" / step)
  (tmp_path / "summary.json").unlink()
  (tmp_path / "diverged.json").write_text('{"weights_from_step": 4, "error": "loss is nan at step 5"}')
  with killed_at_step(10), pytest.raises(KeyboardInterrupt):
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "diverged.json").exists()
  assert latest_checkpoint(str(tmp_path), "export").endswith(os.path.join("checkpoints", "8"))


def test_export_or_eval_of_a_run_that_diverged_before_its_first_checkpoint_names_its_marker(tmp_path):
  """(It said "no checkpoint yet; train it further", which would diverge again.)"""
  config = tiny_config(train={"steps": 4, "log_every": 1, "checkpoint_every": 0},
                       optimizer={"learning_rate": 1e30, "warmup_steps": 0})
  with pytest.raises(FinetuneError, match="loss is"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  with pytest.raises(FinetuneError, match=r"diverged before its first checkpoint \(.*diverged.json says why\); train "
                                          r"it again with the fix that file names, or export another --stage"):
    latest_checkpoint(str(tmp_path), "export")


def test_the_closing_table_shows_perplexity_where_a_stage_models_tokens():
  """(A language-model stage showed its token accuracy alone: 0.0418, where `finetune eval` gave perplexity 30215.)"""
  summaries = {
      "lm": {"classes": [], "dataset": "lm_text", "train_examples_per_s": 120.0,
             "final": {"validation": {"accuracy": 0.0418, "perplexity": 30214.95, "examples_per_s": 900.0}}},
      "clf": {"classes": ["5", "6"], "dataset": "mnist", "class_filter": True, "train_examples_per_s": None,
              "final": {"test": {"accuracy": 0.9, "examples_per_s": 2000.0}},
              "closed_form_probes": {"ridge": {"test": 0.8}}},
  }
  lines = train_lib.results_table(summaries).splitlines()
  assert lines[0].split() == ["stage", "dataset", "split", "accuracy", "perplexity", "train", "ex/s", "eval", "ex/s"]
  assert lines[2].split() == ["lm", "lm_text", "validation", "0.0418", "30214.95", "120", "900"]
  assert lines[3].split() == ["clf", "mnist[5,6]", "test", "0.9000", "-", "-", "2,000"]
  assert lines[4].split() == ["clf", "mnist[5,6]", "test", "(ridge", "probe)", "0.8000", "-", "-", "-"]
  del summaries["lm"]  # no token model: no perplexity column
  assert train_lib.results_table(summaries).splitlines()[0].split() == ["stage", "dataset", "split", "accuracy",
                                                                      "train", "ex/s", "eval", "ex/s"]


def test_class_metrics_are_scikit_learn_s_from_the_counts():
  """Macro-F1 over the classes among the labels or the predictions, balanced accuracy over those with examples:
  class 3 is predicted but absent, class 4 present but never predicted, class 5 neither."""
  metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(0)
  labels = np.concatenate([rng.integers(0, 3, 60), [4, 4]])
  predicted = np.where(rng.random(62) < 0.6, labels, rng.integers(0, 4, 62))
  predicted[-2:] = (0, 3)
  count = lambda values: np.bincount(values, minlength=6).astype(np.float64)
  scores = train_lib.class_metrics(count(labels), count(labels[labels == predicted]), count(predicted))
  assert scores["macro_f1"] == pytest.approx(metrics.f1_score(labels, predicted, average="macro"))
  assert scores["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(labels, predicted))
  assert scores["recall"][3] is None and scores["precision"][4] is None and scores["f1"][5] is None
  assert scores["f1"][3] == scores["f1"][4] == 0.0 and scores["support"] == [int(v) for v in count(labels)]


def test_a_class_task_reports_macro_f1_and_writes_per_class_scores(tmp_path):
  """summary.json's macro_f1 and balanced_accuracy summarise per_class.json, whose counts are the split's."""
  config = tiny_config(train={"steps": 4, "checkpoint_every": 0})
  final = train_lib.train_and_evaluate(config, str(tmp_path))["train"]["final"]
  per_class = json.loads((tmp_path / "per_class.json").read_text())
  assert set(per_class) == set(final)
  for split, metrics in final.items():
    scores = per_class[split]
    assert len(scores["classes"]) == len(scores["support"]) == 10 and sum(scores["support"]) == metrics["num_examples"]
    right = sum(r * n for r, n in zip(scores["recall"], scores["support"]) if r is not None)
    assert right == pytest.approx(metrics["accuracy"] * metrics["num_examples"])
    assert metrics["balanced_accuracy"] == pytest.approx(np.mean([r for r in scores["recall"] if r is not None]))
    assert metrics["macro_f1"] == pytest.approx(np.mean([f for f in scores["f1"] if f is not None]))


def test_gpt2_checkpoints_of_the_transformers_order_are_refused_not_scrambled(tmp_path):
  """Checkpoints record their format (checkpoints/layout.json); GPT-2 weights of format 1, whose c_attn has
  transformers' [q | k | v] order, are refused by every reader and by a resume (which keeps the old format),
  since read as head-major they load without error and attend with the wrong heads. Other models of format 1
  (no c_attn) read as before."""
  from finetune.config import build_config  # pylint: disable=g-import-not-at-top
  config = build_config({
      "task": "causal_lm", "model": {"name": "gpt2", "vocab_size": 64, "n_positions": 32, "n_embd": 16,
                                     "n_layer": 1, "n_head": 2, "dropout": 0.0},
      "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 8, "validation_fraction": 0.0,
               "eval_splits": ("test",), "options": {"kind": "tokens", "length": 16, "vocab_size": 64,
                                                     "num_examples": 32}},
      "train": {"steps": 2, "log_every": 1, "checkpoint_every": 0}})
  train_lib.train_and_evaluate(config, str(tmp_path / "gpt2"))
  layout = tmp_path / "gpt2" / "checkpoints" / "layout.json"
  assert json.loads(layout.read_text()) == {"format": 2, "stacks": []}
  assert "blocks/0/c_attn/kernel" in read_checkpoint_arrays(str(tmp_path / "gpt2" / "checkpoints" / "2"))["params"]
  step = str(tmp_path / "gpt2" / "checkpoints" / "2")
  refused = (r"holds gpt2 weights saved in checkpoint format 1, before format 2 stored c_attn's outputs head by head; "
             "they would now load scrambled")
  layout.unlink()  # as a run before format 2 left it (or a step folder copied away from the record)
  with pytest.raises(FinetuneError, match=refused + r".*copy that folder's layout.json \(which gives the format\)"):
    read_checkpoint_arrays(step)
  layout.write_text(json.dumps({"stacks": []}))  # (a scanned run before format 2 left one without a format)
  start_over = r".*train that stage again: delete .*gpt2 \(its checkpoints cannot be resumed\) or use a new --workdir"
  with pytest.raises(FinetuneError, match=refused + start_over):
    read_checkpoint_arrays(step)
  (tmp_path / "gpt2" / "summary.json").unlink()
  with pytest.raises(FinetuneError, match=refused + start_over):  # resuming it
    train_lib.train_and_evaluate(config, str(tmp_path / "gpt2"))
  assert json.loads(layout.read_text())["format"] == 1
  train_lib.train_and_evaluate(tiny_config(train={"steps": 2, "checkpoint_every": 0}), str(tmp_path / "cnn"))
  (tmp_path / "cnn" / "checkpoints" / "layout.json").unlink()
  assert read_checkpoint_arrays(str(tmp_path / "cnn" / "checkpoints" / "2"))["params"]
  # Adapter folders record the format in adapter.json.
  from finetune import adapters  # pylint: disable=g-import-not-at-top
  lora_b = {"blocks/0/c_attn/lora_b": np.zeros((2, 48), np.float32)}
  folder = adapters.save_adapter(str(tmp_path / "adapter"), lora_b, list(lora_b), config.peft, config.model)
  assert adapters.load_adapter(folder)[0]["format"] == 2
  meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
  (tmp_path / "adapter" / "adapter.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "format"}))
  with pytest.raises(FinetuneError, match=r"adapter .* holds gpt2 weights saved in checkpoint format 1.*train that "
                                          "adapter again"):
    adapters.load_adapter(folder)
  (tmp_path / "adapter" / "adapter.json").write_text(json.dumps({**meta, "format": "two"}))
  with pytest.raises(FinetuneError, match=r"adapter.json is damaged \(format 'two', not a number\)"):
    adapters.load_adapter(folder)
