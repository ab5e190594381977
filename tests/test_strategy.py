"""Strategies as configuration: partition table, freezing, discriminative LRs, schedules, gradual unfreezing."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest

from conftest import step_folders, tiny_config
from finetune import train as train_lib
from finetune.checkpoint import read_checkpoint_arrays
from finetune.config import defaults
from finetune.errors import FinetuneError
from finetune.optim import SCHEDULES
from finetune.partition import flatten
from finetune.step import make_train_step

GROUPS = ["stem", "stage_1", "stage_2", "head"]  # the tiny CNN's layer groups, input to output


def _records(run_dir, split="train"):
  return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))
          if json.loads(line)["split"] == split]


def _init_arrays(config):
  """Parameters and BatchNorm statistics of a stage's initial state (same seed as training)."""
  stage = train_lib.build_stage(config)
  state = stage.init_state(0)(jax.random.PRNGKey(config.seed))
  return flatten(jax.device_get(state.params)), flatten(jax.device_get(state.model_state))


# ---------------------------------------------------------------------------------------------- partition table


def test_partition_table_written_and_groups_cover_every_parameter(tmp_path):
  config = tiny_config(train={"steps": 2}, freeze={"first_n": 1}, optimizer={"lr_factor": 2.0})
  train_lib.train_and_evaluate(config, str(tmp_path))
  rows = [line.split("\t") for line in open(tmp_path / "partition.tsv").read().splitlines()]
  header, rows = rows[0], rows[1:]
  assert header == ["path", "group", "shape", "frozen_for_stage", "trainable_from_step", "peak_lr", "label",
                    "training_steps"]
  by_path = {r[0]: dict(zip(header, r)) for r in rows}
  assert by_path["stem/conv/kernel"]["group"] == "stem" and by_path["stem/conv/kernel"]["frozen_for_stage"] == "true"
  assert by_path["head/kernel"]["peak_lr"] == "0.003" and by_path["stage_2/blocks/0/conv/kernel".replace(
      "stage_2", "stages/1")]["peak_lr"] == "0.0015"
  assert {r[1] for r in rows} == set(GROUPS)


def test_custom_groups_and_bad_partitions_are_errors():
  groups = (("low", "^(stem|stages/0)/"), ("high", "^(stages/1|head)/"))
  stage = train_lib.build_stage(tiny_config(groups=groups, freeze={"first_n": 1}))
  assert stage.strategy.groups == ("low", "high")
  assert stage.strategy.trainable(0) == {p for p in stage.strategy.group_of if not p.startswith(("stem", "stages/0"))}
  cases = [
      ({"groups": (("a", "^stem/"), ("b", "^stem/|^stages/"), ("c", "^head/"))},
       "parameter 'stem/conv/kernel' is in several groups (a, b)"),
      ({"groups": (("a", "^stem/"), ("c", "^head/"))},
       "parameter 'stages/0/blocks/0/conv/kernel' is in no layer group"),
      ({"groups": (("a", "^(stem|stages)/"), ("x", "^nothing/"), ("c", "^head/"))}, "group 'x' matches no parameter"),
      ({"freeze": {"first_n": 5}}, "config.freeze.first_n=5 but the model has 4 layer groups (stem, stage_1, "
       "stage_2, head); use 0..3 (4 freezes every group, which leaves only BatchNorm training, with "
       "config.freeze.train_bn=True)"),
      ({"freeze": {"patterns": ("^stme/",)}}, "config.freeze.patterns: pattern '^stme/' matches no parameter"),
      ({"freeze": {"first_n": 4}}, "every parameter is frozen"),
      ({"optimizer": {"lr_multipliers": (("^nope/", 0.1),)}}, "lr_multipliers: pattern '^nope/' matches no parameter"),
      ({"optimizer": {"lr_range": (1e-3, 1e-4)}}, "must be (lo, hi) with 0 < lo <= hi"),
      ({"unfreeze": {"mode": "gradual"}}, "config.unfreeze.mode='gradual' needs exactly one of "
       "config.unfreeze.every_steps and every_epochs (got 0 and 0.0)"),
      # (A typo'd mode was told it needed every_steps.)
      ({"unfreeze": {"mode": "gradul"}}, "config.unfreeze.mode='gradul'; valid: none, gradual, chain_thaw"),
      ({"unfreeze": {"mode": "gradual", "every_steps": 5}}, "needs more than 15 steps to reach all 4 groups"),
      # (One phase: accepted, and nothing was ever unfrozen.)
      ({"unfreeze": {"mode": "gradual", "every_steps": 2, "initial_groups": 4}},
       "config.unfreeze.mode='gradual' has nothing to unfreeze: config.unfreeze.initial_groups=4 already trains "
       "every group that is not frozen (stem, stage_1, stage_2, head)"),
      ({"freeze": {"first_n": 3}, "unfreeze": {"mode": "chain_thaw", "every_steps": 2}},
       "config.unfreeze.mode='chain_thaw' has nothing to unfreeze: config.unfreeze.initial_groups=1 already trains "
       "every group that is not frozen (head)"),
      ({"optimizer": {"no_decay": (r"(^|/)bias$", r"(^|/)biass$")}},
       "config.optimizer.no_decay: pattern '(^|/)biass$' matches no parameter"),
      # 'frozen' is the frozen parameters' optimizer label: such a group gave them AdamW moments.
      ({"groups": (("frozen", "^(stem|stages)/"), ("head", "^head/"))}, "group name 'frozen' is reserved"),
      ({"groups": (("low*2", "^(stem|stages)/"), ("head", "^head/"))}, "group name 'low*2' is reserved or holds"),
      # (Rates, freezing and unfreezing go by name: two groups of one name got each other's.)
      ({"groups": (("a", "^stem/"), ("b", "^stages/0/"), ("a", "^stages/1/"), ("c", "^head/"))},
       "group name(s) 'a' used more than once; group names must be unique"),
      # (Rules that matched parameters but changed nothing were taken silently.)
      ({"optimizer": {"lr_multipliers": (("kernel$", 0.1), ("^head/kernel$", 10.0))}},
       "lr_multipliers rule ('^head/kernel$', 10.0) sets no rate: every parameter it matches matches an earlier rule"),
      ({"freeze": {"first_n": 1}, "optimizer": {"lr_multipliers": (("^stem/", 5.0),)}},
       "lr_multipliers: pattern '^stem/' matches only parameters config.freeze freezes for the stage"),
      ({"freeze": {"patterns": ("/norm/",), "train_bn": True}},
       "config.freeze.patterns: '/norm/' matches only BatchNorm parameters, which config.freeze.train_bn keeps"),
      ({"freeze": {"first_n": 2, "patterns": ("^stages/0/",)}},
       "config.freeze.patterns: '^stages/0/' matches only parameters of the groups config.freeze.first_n=2 freezes "
       "already (stem, stage_1); drop the pattern or lower first_n"),
      # (A copy, or a pattern inside another, was taken silently: both froze the same.)
      ({"freeze": {"patterns": ("^stages/0/", "^stages/0/.*kernel")}},
       "config.freeze.patterns: '^stages/0/.*kernel' adds nothing to '^stages/0/', which freeze(s) everything it "
       "matches already; drop it, or narrow the other"),
      ({"freeze": {"patterns": ("^stem/", "^stem/")}}, "'^stem/' adds nothing to '^stem/'"),
  ]
  for sections, message in cases:
    with pytest.raises(FinetuneError) as info:
      train_lib.build_stage(tiny_config(**sections))
    assert message in str(info.value), (sections, str(info.value))


# ---------------------------------------------------------------------------------------------------- freezing


def test_frozen_parameters_bit_identical_without_optimizer_state(tmp_path):
  config = tiny_config(train={"steps": 8, "checkpoint_every": 0}, freeze={"first_n": 2},
                       optimizer={"weight_decay": 0.1})
  params0, stats0 = _init_arrays(config)
  summary = train_lib.train_and_evaluate(config, str(tmp_path))["train"]
  final = read_checkpoint_arrays(str(tmp_path / "checkpoints" / "8"))
  frozen_prefixes = ("stem/", "stages/0/")
  for path, value in final["params"].items():
    if path.startswith(frozen_prefixes):
      assert np.array_equal(value, params0[path]) and value.tobytes() == params0[path].tobytes(), path
    else:
      assert not np.array_equal(value, params0[path]), path
  # Frozen BatchNorm layers ran in inference mode: their statistics did not move either.
  for path, value in final["model_state"].items():
    assert np.array_equal(value, stats0[path]) == path.startswith(frozen_prefixes), path
  # Optimizer moments exist only for trainable parameters: adam keeps mu and nu (2 x 4 bytes per parameter), and
  # each of the two trainable groups (stage_2, head) an int32 update count for adam and one for its schedule.
  trainable = summary["trainable_params"]
  assert trainable == sum(v.size for p, v in params0.items() if not p.startswith(frozen_prefixes))
  assert summary["optimizer_state_bytes"] == 2 * 4 * trainable + 2 * 2 * 4


def test_train_bn_keeps_batch_norm_of_frozen_groups_training(tmp_path):
  config = tiny_config(train={"steps": 4, "checkpoint_every": 0}, freeze={"first_n": 2, "train_bn": True})
  params0, stats0 = _init_arrays(config)
  train_lib.train_and_evaluate(config, str(tmp_path))
  final = read_checkpoint_arrays(str(tmp_path / "checkpoints" / "4"))
  assert np.array_equal(final["params"]["stem/conv/kernel"], params0["stem/conv/kernel"])
  assert not np.array_equal(final["params"]["stem/norm/scale"], params0["stem/norm/scale"])
  assert not np.array_equal(final["model_state"]["stem/norm/mean"], stats0["stem/norm/mean"])


def _conv_count(config) -> int:
  stage = train_lib.build_stage(config)
  tx, lr_by_label = stage.optimizer(0)
  step = make_train_step(stage.graphdef, tx, lr_by_label, stage.strategy.trainable(0),
                         stage.strategy.frozen_batch_norm(0))
  batch = train_lib.abstract_batch(stage.pipeline.train_batch(0), stage.mesh)
  return str(jax.make_jaxpr(step)(stage.abstract_state(0), batch)).count("conv_general_dilated")


def test_no_backward_pass_through_frozen_layers():
  # Three convolutions forward. Full fine-tuning adds their weight gradients (3) and input gradients for the two
  # above the stem (2); freezing everything below the head leaves the forward pass only.
  assert _conv_count(tiny_config()) == 8
  assert _conv_count(tiny_config(freeze={"first_n": 3})) == 3
  assert _conv_count(tiny_config(freeze={"first_n": 2})) == 3 + 1  # stage_2's weight gradient only


# ------------------------------------------------------------------------------------------ learning rates


def test_discriminative_learning_rates_follow_the_formulas(tmp_path):
  n = len(GROUPS)
  for optimizer, expected in [
      ({"lr_range": (1e-4, 1e-2)}, {g: 1e-4 * 100 ** (i / (n - 1)) for i, g in enumerate(GROUPS)}),
      ({"lr_factor": 2.6}, {g: 3e-3 / 2.6 ** (n - 1 - i) for i, g in enumerate(GROUPS)}),
  ]:
    config = tiny_config(optimizer={"schedule": "constant", "warmup_steps": 0, **optimizer},
                         train={"steps": 3, "log_every": 1, "checkpoint_every": 0})
    workdir = tmp_path / str(len(os.listdir(tmp_path)))
    train_lib.train_and_evaluate(config, str(workdir))
    for record in _records(workdir):
      for group, lr in expected.items():
        assert math.isclose(record[f"learning_rate/{group}"], lr, rel_tol=1e-6), (group, record)
      assert record["learning_rate"] == record["learning_rate/head"]


def test_regex_multiplier_scales_only_its_parameters(tmp_path):
  config = tiny_config(optimizer={"schedule": "constant", "warmup_steps": 0, "lr_multipliers": (("/bias$", 0.1),)},
                       train={"steps": 2, "log_every": 1, "checkpoint_every": 0})
  train_lib.train_and_evaluate(config, str(tmp_path))
  record = _records(tmp_path)[-1]
  assert math.isclose(record["learning_rate/head"], 3e-3, rel_tol=1e-6)
  assert math.isclose(record["learning_rate/head*0.1"], 3e-4, rel_tol=1e-6)
  rows = [line.split("\t") for line in open(tmp_path / "partition.tsv").read().splitlines()[1:]]
  assert {r[0] for r in rows if r[0].endswith("/bias")}, "the premise: the model has biases"
  for path, group, *_, label, _ in rows:  # every bias, in every group, and nothing else gets the multiplier
    assert label == (f"{group}*0.1" if path.endswith("/bias") else group), (path, label)


def test_slanted_triangular_matches_the_paper():
  cfg = defaults().optimizer
  cfg.cut_frac, cfg.ratio = 0.1, 32.0
  total, peak = 1000, 0.01
  schedule = SCHEDULES.get("stlr")(cfg, peak, total)
  cut = math.floor(total * 0.1)
  for t in (0, 1, 50, 99, 100, 101, 500, 999):
    p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / 0.1 - 1))
    assert math.isclose(float(schedule(t)), peak * (1 + p * 31) / 32, rel_tol=1e-6), t
  assert math.isclose(float(schedule(cut)), peak, rel_tol=1e-6) and float(schedule(0)) == pytest.approx(peak / 32)


def test_one_cycle_rises_then_falls():
  cfg = defaults().optimizer
  schedule = SCHEDULES.get("onecycle")(cfg, 1.0, 100)
  values = [float(schedule(t)) for t in range(100)]
  assert values[0] == pytest.approx(1 / 25) and max(values) == pytest.approx(1.0, rel=1e-3)
  assert values.index(max(values)) == 25 and values[-1] < values[0]


# --------------------------------------------------------------------------------------- gradual unfreezing


def _unfreeze_config(schedule="continue", steps=12, mode="gradual"):
  return tiny_config(unfreeze={"mode": mode, "every_steps": 3, "schedule": schedule},
                     optimizer={"schedule": "linear", "warmup_steps": 0, "lr_factor": 2.0},
                     train={"steps": steps, "log_every": 1, "checkpoint_every": 3})


def test_gradual_unfreezing_happens_exactly_at_the_configured_steps(tmp_path):
  config = _unfreeze_config()
  params0, _ = _init_arrays(config)
  summary = train_lib.train_and_evaluate(config, str(tmp_path))["train"]
  assert summary["phases"] == [{"start": 0, "trainable_groups": ["head"]},
                               {"start": 3, "trainable_groups": ["stage_2", "head"]},
                               {"start": 6, "trainable_groups": ["stage_1", "stage_2", "head"]},
                               {"start": 9, "trainable_groups": GROUPS}]
  records = _records(tmp_path)
  for record in records:
    step = record["step"] - 1  # the record of update index s is written at step s + 1
    trainable = [g for p in summary["phases"] if p["start"] <= step for g in p["trainable_groups"]]
    for i, group in enumerate(GROUPS):
      base = 3e-3 / 2.0 ** (3 - i) * (1 - step / 12)  # linear decay to 0 over the stage, read at the global step
      expected = base if group in trainable else 0.0  # a group not yet unfrozen reports 0
      assert math.isclose(record[f"learning_rate/{group}"], expected, rel_tol=1e-5, abs_tol=1e-12), (group, record)
  final = read_checkpoint_arrays(str(tmp_path / "checkpoints" / "12"))["params"]
  assert not np.array_equal(final["stem/conv/kernel"], params0["stem/conv/kernel"])


def test_entering_a_phase_carries_the_training_labels_state_in_its_own_buffers():
  """At an unfreezing boundary the labels already training keep their optimizer state, the new ones start fresh, and
  the old state's buffers are donated to the new one (it was initialised whole beside the old: two copies)."""
  from finetune.config import stage_configs  # pylint: disable=g-import-not-at-top
  (_, cfg), = stage_configs(tiny_config(unfreeze={"mode": "gradual", "every_steps": 3},
                                        train={"steps": 12, "checkpoint_every": 0}))
  stage = train_lib.build_stage(cfg)
  state = stage.init_state(0)(jax.random.PRNGKey(0))
  moved = jax.tree.map(lambda x: x + 1 if np.issubdtype(x.dtype, np.floating) else x, state.opt_state)
  # (copies: a numpy view of a CPU buffer is an outside reference, which makes XLA keep the buffer, not donate it)
  head = jax.tree.map(lambda x: np.array(x, copy=True), moved[1].inner_states["head"])
  old_leaves = [leaf for leaf in jax.tree.leaves(moved) if leaf.size]
  entered = stage.enter_phase(state.replace(opt_state=moved), 1).opt_state
  assert set(entered[1].inner_states) == {"frozen", "head", "stage_2"}
  for ours, carried in zip(jax.tree.leaves(entered[1].inner_states["head"]), jax.tree.leaves(head)):
    np.testing.assert_array_equal(ours, carried)
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(entered[1].inner_states["stage_2"]))  # Adam's zeros
  assert all(leaf.is_deleted() for leaf in old_leaves)


def test_unfrozen_group_untouched_before_its_phase(tmp_path):
  config_keep = tiny_config(unfreeze={"mode": "gradual", "every_steps": 3},
                            optimizer={"schedule": "linear", "warmup_steps": 0, "lr_factor": 2.0},
                            train={"steps": 12, "log_every": 1, "checkpoint_every": 3, "keep_checkpoints": 5})
  params0, _ = _init_arrays(config_keep)
  train_lib.train_and_evaluate(config_keep, str(tmp_path))
  for step, untouched in [(3, ("stem/", "stages/0/", "stages/1/")), (6, ("stem/", "stages/0/")), (9, ("stem/",))]:
    params = read_checkpoint_arrays(str(tmp_path / "checkpoints" / str(step)))["params"]
    for path, value in params.items():
      assert np.array_equal(value, params0[path]) == path.startswith(untouched), (step, path)


def test_restarted_schedule_starts_again_at_unfreezing(tmp_path):
  train_lib.train_and_evaluate(_unfreeze_config(schedule="restart"), str(tmp_path))
  record = next(r for r in _records(tmp_path) if r["step"] == 7)  # update index 6: stage_1 joins here
  assert math.isclose(record["learning_rate/stage_1"], 3e-3 / 4, rel_tol=1e-5)  # its schedule's first value
  assert math.isclose(record["learning_rate/head"], 3e-3 * (1 - 6 / 12), rel_tol=1e-5)  # continues


def test_cycled_schedule_runs_the_schedule_over_each_phase_for_every_training_group(tmp_path):
  """`unfreeze.schedule='cycle'` (fastai's freeze_to + fit_one_cycle per ULMFiT step): every group training in a
  phase reads the schedule shape over that phase, so each phase starts at the peak of this linear decay."""
  summary = train_lib.train_and_evaluate(_unfreeze_config(schedule="cycle"), str(tmp_path))["train"]
  starts = [p["start"] for p in summary["phases"]] + [12]
  for record in _records(tmp_path):
    step = record["step"] - 1
    phase = max(i for i, start in enumerate(starts[:-1]) if start <= step)
    first, end = starts[phase], starts[phase + 1]
    trainable = summary["phases"][phase]["trainable_groups"]
    for i, group in enumerate(GROUPS):
      expected = 3e-3 / 2.0 ** (3 - i) * (1 - (step - first) / (end - first)) if group in trainable else 0.0
      assert math.isclose(record[f"learning_rate/{group}"], expected, rel_tol=1e-5, abs_tol=1e-12), (group, record)


def test_chain_thaw_trains_one_group_at_a_time(tmp_path):
  summary = train_lib.train_and_evaluate(_unfreeze_config(mode="chain_thaw", steps=16), str(tmp_path))["train"]
  assert [p["trainable_groups"] for p in summary["phases"]] == [["head"], ["stem"], ["stage_1"], ["stage_2"], GROUPS]
  # The summary and partition.tsv give the steps each group rests in (they said the head trains from step 0 on,
  # the stem from step 3 on).
  short = train_lib.build_stage(_unfreeze_config(mode="chain_thaw", steps=16)).strategy.short()
  assert "head                170 params  trains in steps 0-2, 12-," in short, short
  assert "stage_2           1,184 params  trains from step 9," in short, short
  rows = [line.split("\t") for line in open(tmp_path / "partition.tsv").read().splitlines()[1:]]
  assert {row[0]: row[-1] for row in rows}["stem/conv/kernel"] == "3-5, 12-"
  # Plain `learning_rate` is the head's, and while the head rests the top training group's (it logged 0).
  for record in _records(tmp_path):
    resting = 3 <= record["step"] - 1 < 12
    training = ("stem" if record["step"] - 1 < 6 else "stage_1" if record["step"] - 1 < 9 else "stage_2") \
        if resting else "head"
    assert record["learning_rate"] == record[f"learning_rate/{training}"] > 0, record


def test_resume_across_an_unfreezing_boundary_equals_uninterrupted(tmp_path, monkeypatch):
  config = _unfreeze_config()
  train_lib.train_and_evaluate(config, str(tmp_path / "clean"))
  original = train_lib.InputPipeline.train_batch

  def crash_at_step_7(self, step):  # dies inside the third phase, after checkpoint 6 (a boundary)
    if step == 7:
      raise KeyboardInterrupt
    return original(self, step)

  monkeypatch.setattr(train_lib.InputPipeline, "train_batch", crash_at_step_7)
  with pytest.raises(KeyboardInterrupt):
    train_lib.train_and_evaluate(config, str(tmp_path / "resumed"))
  monkeypatch.setattr(train_lib.InputPipeline, "train_batch", original)
  assert step_folders(tmp_path / "resumed" / "checkpoints") == ["3", "6"]
  train_lib.train_and_evaluate(config, str(tmp_path / "resumed"))
  clean = read_checkpoint_arrays(str(tmp_path / "clean" / "checkpoints" / "12"))
  resumed = read_checkpoint_arrays(str(tmp_path / "resumed" / "checkpoints" / "12"))
  for collection in ("params", "model_state"):
    for path, value in clean[collection].items():
      np.testing.assert_array_equal(resumed[collection][path], value, err_msg=path)


def test_optimizer_applies_each_groups_rate(tmp_path):
  """Plain SGD, one step: a group's update is exactly its rate times the (shared) gradient."""
  sgd = {"name": "sgd", "momentum": 0.0, "schedule": "constant", "warmup_steps": 0, "learning_rate": 0.1,
         "grad_clip_norm": 0.0}
  train = {"steps": 1, "checkpoint_every": 0}
  uniform = tiny_config(optimizer=sgd, train=train)
  spread = tiny_config(optimizer={**sgd, "lr_range": (0.001, 0.1)}, train=train)
  params0, _ = _init_arrays(uniform)
  train_lib.train_and_evaluate(uniform, str(tmp_path / "uniform"))
  train_lib.train_and_evaluate(spread, str(tmp_path / "spread"))
  a = read_checkpoint_arrays(str(tmp_path / "uniform" / "checkpoints" / "1"))["params"]
  b = read_checkpoint_arrays(str(tmp_path / "spread" / "checkpoints" / "1"))["params"]
  rates = {g: 0.001 * 100 ** (i / 3) for i, g in enumerate(GROUPS)}
  prefixes = {"stem": "stem/", "stage_1": "stages/0/", "stage_2": "stages/1/", "head": "head/"}
  for group, prefix in prefixes.items():
    for path in (p for p in a if p.startswith(prefix)):
      np.testing.assert_allclose(b[path] - params0[path], (a[path] - params0[path]) * rates[group] / 0.1,
                                 rtol=1e-4, atol=1e-7, err_msg=path)


def test_unfreezing_by_epochs(tmp_path):
  config = tiny_config(unfreeze={"mode": "gradual", "every_epochs": 1.0}, train={"epochs": 5.0, "steps": 0})
  stage = train_lib.build_stage(config)
  spe = stage.pipeline.steps_per_epoch  # 1,438 training digits // 32 = 44
  assert spe == 44 and stage.total_steps == 5 * 44
  assert [p.start for p in stage.strategy.phases] == [0, 44, 88, 132]


def test_chain_thaw_returning_group_applies_the_rate_it_logs():
  """A label that rests and trains again starts a fresh optimizer state; its first update uses the logged rate."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  config = tiny_config(unfreeze={"mode": "chain_thaw", "every_steps": 3},
                       optimizer={"name": "sgd", "momentum": 0.0, "schedule": "linear", "warmup_steps": 0,
                                  "grad_clip_norm": 0.0}, train={"steps": 16})
  stage = train_lib.build_stage(config)
  strategy = stage.strategy
  last = len(strategy.phases) - 1  # 'all': head trains again after resting in phases 1..3
  assert strategy.phases[last].start == 12 and strategy.label_start("head", last) == 12
  assert strategy.label_start("head", 0) == 0 and strategy.label_start("stem", last) == 12
  tx, lr_by_label = stage.optimizer(last)
  params = jax.tree.map(jnp.ones_like, stage.abstract_params)
  grads = jax.tree.map(jnp.ones_like, stage.abstract_params)
  updates, _ = tx.update(grads, tx.init(params), params)
  applied = -float(flatten(updates)["head/bias"][0])
  assert math.isclose(applied, float(lr_by_label["head"](12)), rel_tol=1e-6)
  assert math.isclose(applied, 3e-3 * (1 - 12 / 16), rel_tol=1e-6)
  _, first_phase_lrs = stage.optimizer(1)  # head rests in phase 1 and logs 0
  assert float(first_phase_lrs["head"](4)) == 0.0


def test_train_bn_trains_batch_norm_of_groups_not_yet_unfrozen(tmp_path):
  config = tiny_config(unfreeze={"mode": "gradual", "every_steps": 3}, freeze={"train_bn": True},
                       train={"steps": 12, "checkpoint_every": 3, "keep_checkpoints": 4})
  stage = train_lib.build_stage(config)
  trainable0 = stage.strategy.trainable(0)
  assert "stem/norm/scale" in trainable0 and "stem/conv/kernel" not in trainable0
  assert stage.strategy.frozen_batch_norm(0) == ()
  params0, stats0 = _init_arrays(config)
  train_lib.train_and_evaluate(config, str(tmp_path))
  after = read_checkpoint_arrays(str(tmp_path / "checkpoints" / "3"))
  assert np.array_equal(after["params"]["stem/conv/kernel"], params0["stem/conv/kernel"])
  assert not np.array_equal(after["params"]["stem/norm/scale"], params0["stem/norm/scale"])
  assert not np.array_equal(after["model_state"]["stem/norm/mean"], stats0["stem/norm/mean"])
  # The start-of-stage summary says so: the stem's BatchNorm from step 0, its kernel when the stem unfreezes. (It
  # used to give one tensor's start for the whole group.)
  stem = next(line for line in stage.strategy.short().splitlines() if line.split()[0] == "stem")
  assert "trains in parts: 2 tensors throughout, 1 tensor from step 9" in stem, stem


def test_train_bn_on_a_model_without_batch_norm_is_refused():
  """(Taken silently: LayerNorm freezes with its group, so the setting changed nothing.)"""
  vit = {"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32}
  with pytest.raises(FinetuneError, match="config.freeze.train_bn=True but the model has no BatchNorm layer"):
    train_lib.build_stage(tiny_config(model=vit, freeze={"first_n": 1, "train_bn": True}))


def test_a_modules_to_save_entry_the_freeze_rules_undo_is_refused():
  """(Taken silently: the head was frozen after all, and the stage trained LoRA under an untrained classifier.)"""
  vit = {"name": "vit", "image_size": 8, "patch_size": 4, "width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32}
  lora = {"method": "lora", "targets": ("query", "value"), "rank": 2, "modules_to_save": ("^head/",)}
  with pytest.raises(FinetuneError, match=r"config.peft.modules_to_save entry '\^head/' trains head/(bias|kernel), "
                                          r"head/(bias|kernel) fully, but config.freeze freezes all of them"):
    train_lib.build_stage(tiny_config(model=vit, peft=lora, freeze={"patterns": ("^head/",)}))
  stage = train_lib.build_stage(tiny_config(model=vit, peft=lora, freeze={"patterns": ("^head/bias$",)}))
  assert "head/kernel" in stage.strategy.trainable(0) and "head/bias" not in stage.strategy.trainable(0)
