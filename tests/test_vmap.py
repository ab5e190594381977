"""Points trained together (finetune/vmap.py) equal the same points trained alone, stage by stage."""

from __future__ import annotations

import glob
import json
import os
import types

import jax
import numpy as np
import pytest

from conftest import fake_devices_env, killed_at_step, run_python, step_folders, tiny_config
from finetune import train as train_lib
from finetune import vmap
from finetune.checkpoint import Checkpointer, read_checkpoint_arrays
from finetune.config import build_config
from finetune.errors import FinetuneError
from finetune.partition import flatten

# Float rounding only: lr_k * schedule vs lr_0 * schedule * (lr_k / lr_0), and batched vs single matmuls.
RTOL, ATOL = 2e-4, 2e-6


def with_values(cfg, **sections):
  """`cfg` with nested values merged in (e.g. seed=1, optimizer={'learning_rate': 0.01})."""
  raw = json.loads(cfg.to_json())

  def merge(into: dict, values: dict) -> None:
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(into.get(key), dict):
        merge(into[key], value)
      else:
        into[key] = value

  merge(raw, sections)
  return build_config(raw)


def _final_params(run_dir: str) -> dict[str, np.ndarray]:
  checkpoints = os.path.join(run_dir, "checkpoints")
  last = max(int(name) for name in os.listdir(checkpoints) if name.isdigit())
  return flatten(read_checkpoint_arrays(os.path.join(checkpoints, str(last)))["params"])


def _losses(run_dir: str) -> list[float]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def _assert_same_run(together_dir: str, alone_dir: str) -> None:
  np.testing.assert_allclose(_losses(together_dir), _losses(alone_dir), rtol=RTOL, atol=ATOL)
  mine, theirs = _final_params(together_dir), _final_params(alone_dir)
  assert mine.keys() == theirs.keys()
  for path in mine:
    np.testing.assert_allclose(mine[path], theirs[path], rtol=RTOL, atol=ATOL, err_msg=path)
  with open(os.path.join(together_dir, "summary.json")) as f:
    together = json.load(f)
  with open(os.path.join(alone_dir, "summary.json")) as f:
    alone = json.load(f)
  for split, metrics in alone["final"].items():
    assert together["final"][split]["loss"] == pytest.approx(metrics["loss"], rel=1e-3)
  assert together["optimizer_state_bytes"] == alone["optimizer_state_bytes"]


def test_points_differing_in_seed_and_learning_rate_equal_their_solo_runs(tmp_path):
  # Dropout on, a cosine schedule with warmup, discriminative rates (two labels scaled together) and gradual
  # unfreezing (a phase boundary inside the loop): everything the vmapped loop must carry per point.
  base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (16, 16), "dropout": 0.1},
                     optimizer={"learning_rate": 3e-3, "warmup_steps": 2, "lr_factor": 2.0},
                     unfreeze={"mode": "gradual", "every_steps": 5},
                     train={"steps": 12, "log_every": 4, "checkpoint_every": 6})
  configs = [with_values(base, seed=0), with_values(base, seed=1),
             with_values(base, seed=1, optimizer={"learning_rate": 1e-2})]
  together = [str(tmp_path / "together" / str(k)) for k in range(3)]
  vmap.train_points(configs, together)
  for k, cfg in enumerate(configs):
    alone = str(tmp_path / "alone" / str(k))
    train_lib.train_and_evaluate(cfg, alone)
    _assert_same_run(together[k], alone)
  # Seeds and rates really differ between the points (the test would pass vacuously otherwise).
  assert _losses(together[0]) != _losses(together[1]) != _losses(together[2])
  # Checkpoints are kept per point as `finetune train` keeps them, so a finished point is skipped on a re-run.
  assert step_folders(os.path.join(together[0], "checkpoints"))[:2] == ["12", "6"]
  assert vmap.train_points(configs, together)[0]["train"]["final"] == \
      json.load(open(os.path.join(together[0], "summary.json")))["final"]


def test_points_together_wait_once_more_than_a_few_steps_are_in_flight(tmp_path, monkeypatch):
  """As train_loop: the vmapped loop waits on the step MAX_STEPS_IN_FLIGHT back, not only at logging."""
  waited = []
  real = jax.block_until_ready
  monkeypatch.setattr(vmap.jax, "block_until_ready", lambda tree: (waited.append(tree), real(tree))[1])
  base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (16,)},
                     train={"steps": 12, "log_every": 12, "checkpoint_every": 0})
  vmap.train_points([with_values(base, seed=0), with_values(base, seed=1)],
                    [str(tmp_path / "a"), str(tmp_path / "b")])
  steps = [tree for tree in waited if isinstance(tree, dict) and "loss" in tree]
  assert len(steps) == 12 - train_lib.MAX_STEPS_IN_FLIGHT
  assert all(np.shape(tree["loss"]) == (2,) for tree in steps)  # one loss per point: the vmapped step's


def test_points_killed_while_evaluating_at_a_checkpoint_step_resume_with_every_evaluation(tmp_path, monkeypatch):
  """An evaluation at a checkpoint step runs before that checkpoint is saved: killed inside it, the points resume
  from the checkpoint before and evaluate again, so metrics.jsonl equals an uninterrupted run's."""
  base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (8,)},
                     train={"steps": 12, "log_every": 4, "checkpoint_every": 4, "eval_every": 4})
  configs = [base, with_values(base, seed=1)]
  clean = [str(tmp_path / "clean" / str(k)) for k in range(2)]
  killed = [str(tmp_path / "killed" / str(k)) for k in range(2)]
  vmap.train_points(configs, clean)
  real_evaluate, calls = train_lib.evaluate, []

  def killed_in_the_third_evaluation(*args, **kwargs):  # step 8's, of the first point
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real_evaluate(*args, **kwargs)

  monkeypatch.setattr(train_lib, "evaluate", killed_in_the_third_evaluation)
  with pytest.raises(KeyboardInterrupt):
    vmap.train_points(configs, killed)
  monkeypatch.setattr(train_lib, "evaluate", real_evaluate)
  vmap.train_points(configs, killed)
  for k in range(2):
    evaluations = [[(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(run, "metrics.jsonl")))
                    if r["split"] == "validation"] for run in (clean[k], killed[k])]
    assert evaluations[1] == evaluations[0] and [step for step, _ in evaluations[0]] == [4, 8, 12]
    # timing.json as train_loop writes it, over both attempts: the resumed points read step 4's and add 8 steps
    # (points trained together never wrote it, so a resumed group's throughput covered its last attempt only).
    for run in (clean[k], killed[k]):
      timing = json.load(open(os.path.join(run, "timing.json")))
      assert sorted(timing, key=int) == ["4", "8", "12"] and timing["12"]["steps"] == 12, timing


def test_point_map_unrolled_equals_vmap():
  import jax
  import jax.numpy as jnp

  def fn(tree, scale):
    return {"y": tree["w"] @ tree["x"] * scale}, jnp.sum(tree["x"])

  args = ({"w": np.arange(24.0).reshape(2, 3, 4), "x": np.arange(8.0).reshape(2, 4)}, np.array([1.0, -2.0]))
  by_vmap = jax.jit(vmap.point_map(fn, 2, unroll=False))(*args)
  unrolled = jax.jit(vmap.point_map(fn, 2, unroll=True))(*args)
  assert jax.tree.structure(by_vmap) == jax.tree.structure(unrolled)
  for a, b in zip(jax.tree.leaves(by_vmap), jax.tree.leaves(unrolled)):
    np.testing.assert_allclose(a, b)
  assert unrolled[0]["y"].shape == (2, 3) and unrolled[1][1] == 22.0  # 4 + 5 + 6 + 7


def test_convolutional_points_unroll_on_cpu_and_equal_their_solo_runs(tmp_path, capsys):
  # XLA:CPU would run vmap's grouped convolutions far slower; the unrolled program must still equal the solo runs.
  base = tiny_config(train={"steps": 6, "log_every": 3, "checkpoint_every": 0})  # the CNN
  stage = train_lib.build_stage(base)
  assert vmap.unroll_points(stage.abstract_model)
  assert not vmap.unroll_points(train_lib.build_stage(
      tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (8,)})).abstract_model)
  configs = [with_values(base, seed=0), with_values(base, seed=1, optimizer={"learning_rate": 1e-2})]
  together = [str(tmp_path / "together" / str(k)) for k in range(2)]
  vmap.train_points(configs, together)
  assert "run one after another inside one program" in capsys.readouterr().out
  for k, cfg in enumerate(configs):
    alone = str(tmp_path / "alone" / str(k))
    train_lib.train_and_evaluate(cfg, alone)
    _assert_same_run(together[k], alone)
  assert _losses(together[0]) != _losses(together[1])


def test_regularizer_strengths_train_together_across_stages(tmp_path):
  # The forgetting sweep's shape: a source stage, then EWC at several strengths. The strengths ride in the
  # anchors, so one program serves them all.
  base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (16,)}, stages={
      "pretrain": {"data": {"classes": (0, 1, 2, 3, 4)}, "train": {"steps": 8}},
      "target": {"data": {"classes": (5, 6, 7, 8, 9)}, "init_from": "stage:pretrain", "dont_load": (r"^head/",),
                 "train": {"steps": 8}, "regularize": {"ewc": {"weight": 1.0, "num_examples": 64}}}})
  configs = [base, with_values(base, stages={"target": {"regularize": {"ewc": {"weight": 30.0}}}})]
  together = [str(tmp_path / "together" / str(k)) for k in range(2)]
  vmap.train_points(configs, together)
  for k, cfg in enumerate(configs):
    alone = str(tmp_path / "alone" / str(k))
    train_lib.train_and_evaluate(cfg, alone)
    for stage in ("pretrain", "target"):
      _assert_same_run(os.path.join(together[k], stage), os.path.join(alone, stage))
  distances = [np.linalg.norm(_final_params(os.path.join(d, "target"))["layers/0/kernel"] -
                              _final_params(os.path.join(d, "pretrain"))["layers/0/kernel"]) for d in together]
  assert distances[1] < distances[0]  # the stronger pull stayed closer to the source weights


def test_lwf_temperature_and_online_ewc_decay_train_together(tmp_path):
  # Three tasks, the last with online EWC (gamma weighs the oldest task's Fisher) and LwF: the points differ only
  # in gamma and the temperature, numbers inside each point's anchors.
  task = lambda classes, source: {"data": {"classes": classes}, "init_from": source, "dont_load": (r"^head/",),
                                  "train": {"steps": 6}}
  base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (16,)}, stages={
      "a": {"data": {"classes": (0, 1, 2)}, "train": {"steps": 6}}, "b": task((3, 4, 5), "stage:a"),
      "c": {**task((6, 7, 8, 9), "stage:b"), "regularize": {
          "ewc": {"weight": 100.0, "online": True, "gamma": 1.0, "num_examples": 32},
          "lwf": {"weight": 1.0, "temperature": 2.0}}}})
  configs = [base, with_values(base, stages={"c": {"regularize": {"ewc": {"gamma": 0.1},
                                                                  "lwf": {"temperature": 8.0}}}})]
  assert vmap.incompatibility(*configs) == ""
  together = [str(tmp_path / "together" / str(k)) for k in range(2)]
  vmap.train_points(configs, together)
  for k, cfg in enumerate(configs):
    alone = str(tmp_path / "alone" / str(k))
    train_lib.train_and_evaluate(cfg, alone)
    for stage in ("a", "b", "c"):
      _assert_same_run(os.path.join(together[k], stage), os.path.join(alone, stage))
  assert _losses(os.path.join(together[0], "c")) != _losses(os.path.join(together[1], "c"))


def test_a_point_workdir_inside_another_s_is_refused_in_either_order(tmp_path):
  """(Locked one after another, the inner one blamed 'another finetune process', this one, while the other order
  trained the outer point over the inner one's files.)"""
  base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (8,)})
  for order in ([tmp_path / "w", tmp_path / "w" / "sub"], [tmp_path / "v" / "sub", tmp_path / "v"]):
    with pytest.raises(FinetuneError, match=r"point workdir .*/sub is inside point workdir .*; give each point a "
                                            r"folder of its own"):
      vmap.train_points([base, with_values(base, seed=1)], [str(path) for path in order])
  assert not (tmp_path / "w").exists() and not (tmp_path / "v").exists()


def test_a_point_s_stage_folder_held_by_a_run_started_inside_it_fails_that_point_only(tmp_path):
  """Points trained together hold each stage's folder while the stage runs, as `finetune train` does."""
  from finetune import files  # pylint: disable=g-import-not-at-top
  base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (8,)},
                     train={"steps": 2, "checkpoint_every": 0},
                     stages={"pretrain": {}, "finetune": {"init_from": "stage:pretrain"}})
  configs, workdirs = [base, with_values(base, seed=1)], [str(tmp_path / "a"), str(tmp_path / "b")]
  with files.exclusive_workdir(str(tmp_path / "b" / "finetune")):  # a run started there first
    with pytest.raises(FinetuneError, match=rf"{tmp_path}/b: {tmp_path}/b/finetune is in use by another finetune "
                                            r"process .*: a run started inside stage 'finetune''s folder.*"
                                            r"\(the other 1 points finished\)"):
      vmap.train_points(configs, workdirs)
  assert (tmp_path / "a" / "finetune" / "summary.json").exists()
  assert (tmp_path / "b" / "pretrain" / "summary.json").exists()
  assert not (tmp_path / "b" / "finetune" / "summary.json").exists()
  vmap.train_points(configs, workdirs)  # once that run has ended
  assert (tmp_path / "b" / "finetune" / "summary.json").exists()


def test_incompatible_points_are_refused_with_the_differing_key(tmp_path):
  base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (8,)})
  assert vmap.incompatibility(base, with_values(base, seed=3, optimizer={"learning_rate": 1.0})) == ""
  reason = vmap.incompatibility(base, with_values(base, data={"batch_size": 16}))
  assert "data.batch_size" in reason
  with pytest.raises(FinetuneError, match="data.batch_size"):
    vmap.train_points([base, with_values(base, data={"batch_size": 16})], [str(tmp_path / "a"), str(tmp_path / "b")])
  assert "early stopping" in vmap.incompatibility(
      base, with_values(base, train={"early_stopping": {"metric": "validation/accuracy", "patience": 2},
                                  "eval_every": 4}))
  assert vmap.groups([base, with_values(base, seed=1), with_values(base, data={"batch_size": 16}),
                      with_values(base, seed=2)], size=2) == [[0, 1], [2], [3]]
  # Each point's checkpoint steps are also logging steps for the whole group: its metrics would differ from solo.
  assert "train.checkpoint_every differs" in vmap.incompatibility(
      base, with_values(base, train={"checkpoint_every": base.train.checkpoint_every + 1}))
  assert vmap.incompatibility(base, with_values(base, train={"keep_checkpoints": 5}, seed=3)) == ""
  # An absolute lr_range sets every group's rate: a per-point learning_rate would be unused, not scaled.
  ranged = with_values(base, optimizer={"lr_range": (1e-4, 1e-3)})
  assert "optimizer.lr_range" in vmap.incompatibility(ranged, with_values(ranged, optimizer={"learning_rate": 0.5}))
  assert vmap.incompatibility(ranged, with_values(ranged, seed=2)) == ""
  # Equal rates need no scaling, so 0 is fine (unused under lr_range); a 0 against another rate is not.
  unused = with_values(ranged, optimizer={"learning_rate": 0.0})
  assert vmap.incompatibility(unused, with_values(unused, seed=2)) == ""
  assert "one is 0" in vmap.incompatibility(with_values(base, optimizer={"learning_rate": 0.0}), base)


def test_points_whose_rates_come_from_lr_range_train_together_as_alone(tmp_path):
  # learning_rate 0 is unused under lr_range: the points' lr_scale is 1, not 0 / 0.
  base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (16, 16)},
                     optimizer={"learning_rate": 0.0, "lr_range": (1e-3, 1e-2)},
                     train={"steps": 6, "log_every": 3, "checkpoint_every": 0})
  configs = [with_values(base, seed=0), with_values(base, seed=1)]
  together = [str(tmp_path / "together" / str(k)) for k in range(2)]
  vmap.train_points(configs, together)
  for k, cfg in enumerate(configs):
    alone = str(tmp_path / "alone" / str(k))
    train_lib.train_and_evaluate(cfg, alone)
    _assert_same_run(together[k], alone)
  assert _losses(together[0])[-1] < _losses(together[0])[0]  # it trained (a zero rate would leave it flat)


def test_a_point_whose_loss_diverges_stops_alone(tmp_path):
  base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (8,)},
                     optimizer={"grad_clip_norm": 0.0, "warmup_steps": 0},
                     train={"steps": 8, "log_every": 2, "checkpoint_every": 0})
  configs = [base, with_values(base, optimizer={"learning_rate": 1e30})]
  dirs = [str(tmp_path / "ok"), str(tmp_path / "diverges")]
  with pytest.raises(FinetuneError, match="diverges.*loss is"):
    vmap.train_points(configs, dirs)
  assert os.path.isfile(os.path.join(dirs[0], "summary.json"))
  assert not os.path.exists(os.path.join(dirs[1], "summary.json"))


def test_a_point_whose_evaluation_is_not_finite_stops_alone_before_saving_it(tmp_path):
  """lr 1e30 without clipping: step 1's training loss is finite, the evaluation after its update is not. As alone,
  the point stops at that evaluation (mid-run with eval_every, or the final one) and its diverged weights are not
  checkpointed; the other point finishes."""
  base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (8,)},
                     optimizer={"grad_clip_norm": 0.0, "warmup_steps": 0, "schedule": "constant"},
                     train={"steps": 4, "log_every": 2, "checkpoint_every": 1, "eval_every": 1})
  for name, cfg in (("mid_run", base), ("final", with_values(base, train={"steps": 1, "eval_every": 0}))):
    dirs = [str(tmp_path / name / "diverges"), str(tmp_path / name / "ok")]
    with pytest.raises(FinetuneError, match="diverges: validation loss is nan at step 1.*the other 1 points finished"):
      vmap.train_points([with_values(cfg, optimizer={"learning_rate": 1e30}), with_values(cfg, seed=1)], dirs)
    assert os.path.isfile(os.path.join(dirs[1], "summary.json"))
    assert not os.path.exists(os.path.join(dirs[0], "summary.json"))
    if name == "mid_run":
      assert not step_folders(os.path.join(dirs[0], "checkpoints"))


def test_the_survivors_of_an_evaluation_failure_between_log_lines_log_their_own_metrics(tmp_path):
  """(The steps since the last log line kept every point's rows: at the next log line a survivor read the failed
  point's losses, logging them or failing on its NaN.)"""
  base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (8,)},
                     optimizer={"grad_clip_norm": 0.0, "warmup_steps": 0, "schedule": "constant"},
                     train={"steps": 8, "log_every": 4, "checkpoint_every": 0, "eval_every": 2})
  dirs = [str(tmp_path / "diverges"), str(tmp_path / "ok")]
  with pytest.raises(FinetuneError, match="diverges: validation loss is nan at step 2.*the other 1 points finished"):
    vmap.train_points([with_values(base, optimizer={"learning_rate": 1e30}), with_values(base, seed=1)], dirs)
  train_lib.train_and_evaluate(with_values(base, seed=1), str(tmp_path / "alone"))
  _assert_same_run(dirs[1], str(tmp_path / "alone"))


def test_points_together_refuse_a_later_stage_s_missing_data_before_training(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (8,)}, train={"steps": 4}, stages={
      "first": {}, "later": {"data": {"name": "mnist", "path": "no/such/mnist"}}})
  dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
  with pytest.raises(FinetuneError, match="stage 'later': config.data.path 'no/such/mnist' does not exist"):
    vmap.train_points([base, with_values(base, seed=1)], dirs)
  assert not any(os.path.exists(os.path.join(d, "first")) for d in dirs)


def test_a_point_that_cannot_open_its_stage_fails_alone(tmp_path):
  base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (8,)}, train={"steps": 4})
  dirs = [str(tmp_path / "broken"), str(tmp_path / "ok")]
  os.makedirs(os.path.join(dirs[0], "checkpoints", "2", "state"))  # an empty, unreadable checkpoint to resume from
  with pytest.raises(FinetuneError, match="broken: cannot restore checkpoint.*the other 1 points finished"):
    vmap.train_points([base, with_values(base, seed=1)], dirs)
  assert os.path.isfile(os.path.join(dirs[1], "summary.json"))


def test_points_together_time_every_step_of_an_interval(tmp_path, monkeypatch):
  """Throughput counts all steps of each logging interval over all of its time (a clock that advances one second
  per step: 8 steps take 8 s, whatever the logging cadence)."""
  clock = [0.0]

  def pace_and_tick(pending):
    clock[0] += 1.0
    return real_pace(pending)

  real_pace = train_lib.pace
  monkeypatch.setattr(train_lib, "pace", pace_and_tick)
  # The interval timer's clock only (train.py reads no other clock).
  monkeypatch.setattr(train_lib, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
  base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (8,)},
                     train={"steps": 8, "log_every": 4, "checkpoint_every": 0})
  dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
  summaries = vmap.train_points([base, with_values(base, seed=1)], dirs)
  for summary in summaries:
    assert summary["train"]["train_examples_per_s"] == pytest.approx(base.data.batch_size)  # 1 step per second
  with open(os.path.join(dirs[0], "metrics.jsonl")) as f:
    rates = [r["examples_per_s"] for r in map(json.loads, f) if r["split"] == "train"]
  assert rates == pytest.approx([base.data.batch_size] * 2)


def test_points_together_each_log_to_their_own_wandb_run(tmp_path, monkeypatch):
  """Each point holds its wandb run while the group trains (opening one must not finish another's)."""
  monkeypatch.setenv("WANDB_SILENT", "true")
  base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (8,)}, wandb={"mode": "offline"},
                     train={"steps": 4, "log_every": 2})
  dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
  vmap.train_points([base, with_values(base, seed=1)], dirs)
  for run_dir in dirs:
    assert os.path.isfile(os.path.join(run_dir, "summary.json"))
    runs = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "*.wandb"))
    assert len(runs) == 1 and os.path.getsize(runs[0]) > 0


def test_a_point_training_alone_that_diverges_stops_alone(tmp_path):
  """A point whose resume step differs from the others' trains alone; its failure is reported at the end too,
  after the points behind it have trained."""
  base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (8,)},
                     optimizer={"grad_clip_norm": 0.0, "warmup_steps": 0},
                     train={"steps": 12, "log_every": 2, "checkpoint_every": 6})
  configs = [with_values(base, optimizer={"learning_rate": 1e30}), base]
  dirs = [str(tmp_path / "diverges"), str(tmp_path / "ok")]
  with killed_at_step(8), pytest.raises(KeyboardInterrupt):  # the healthy point stopped after its step-6 checkpoint
    train_lib.train_and_evaluate(configs[1], dirs[1])
  with pytest.raises(FinetuneError, match="diverges.*loss is.*the other 1 points finished"):
    vmap.train_points(configs, dirs)  # starts 0 and 6: each trains alone, the diverging one first
  assert os.path.isfile(os.path.join(dirs[1], "summary.json"))
  assert not os.path.exists(os.path.join(dirs[0], "summary.json"))


def test_points_together_on_a_sharded_mesh_equal_their_solo_runs():
  # data=2 x fsdp=2 x tensor=2 on 8 host devices: the point axis is stacked in front of every sharded axis. (A solo
  # run on that mesh equals one device: tests/test_multidevice.py.)
  code = r"""
import os, tempfile
import sys; sys.path.insert(0, "tests")
import numpy as np
from conftest import tiny_config
from finetune import train, vmap
from test_vmap import _final_params, with_values
base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (16, 16)}, train={"steps": 6, "log_every": 3},
                   mesh={"data": 2, "fsdp": 2, "tensor": 2})
configs = [with_values(base, seed=0), with_values(base, seed=1, optimizer={"learning_rate": 0.01})]
out = tempfile.mkdtemp()
vmap.train_points(configs, [f"{out}/together0", f"{out}/together1"])
for k in range(2):
  train.train_and_evaluate(configs[k], f"{out}/alone{k}")
  a, b = _final_params(f"{out}/together{k}"), _final_params(f"{out}/alone{k}")
  assert a and sorted(a) == sorted(b)
  for path in a:
    np.testing.assert_allclose(a[path], b[path], rtol=2e-4, atol=2e-6, err_msg=path)
print("OK")
"""
  result = run_python(code, fake_devices_env(8))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout


@pytest.mark.parametrize("checkpoint_every", [0, 2])
def test_points_together_keep_one_copy_of_their_states_and_compile_one_evaluation(checkpoint_every, tmp_path,
                                                                                  monkeypatch):
  """(Each point's state stayed alive beside the stacked one, and every evaluation left a third copy: 4 points of
  a 1M-parameter MLP held 12 states at a log step instead of 4; and each point compiled its own evaluation.) Until
  orbax has written a checkpoint it holds the point's sliced state and a copy of its own, so the points' writes go
  one at a time (all 4 in flight held 12 states: CI, where the disk was slow, saw 8 at the next log line)."""
  base = tiny_config(model={"name": "mlp", "input_size": 64, "hidden": (1024, 1024)},
                     train={"steps": 4, "log_every": 2, "eval_every": 2, "checkpoint_every": checkpoint_every})
  state_bytes = sum(leaf.size * leaf.dtype.itemsize
                    for leaf in jax.tree.leaves(train_lib.build_stage(base).abstract_state(0)))
  live = {"baseline": sum(x.nbytes for x in jax.live_arrays()), "peak": 0}
  real_log_interval, real_compile = train_lib.log_interval, train_lib.compile_eval_step
  real_save, real_wait = Checkpointer.save, Checkpointer.wait
  compiles, in_flight, most_in_flight = [], set(), [0]

  def measure():
    live["peak"] = max(live["peak"], sum(x.nbytes for x in jax.live_arrays()))

  def log_interval(*args, **kwargs):  # at step 4: after the evaluation (and checkpoint) of step 2
    measure()
    return real_log_interval(*args, **kwargs)

  def save(self, step, state):  # (a write not waited for may still be in flight, however fast the disk is)
    real_save(self, step, state)
    in_flight.add(self.directory)
    most_in_flight[0] = max(most_in_flight[0], len(in_flight))
    measure()

  def wait(self):
    real_wait(self)
    in_flight.discard(self.directory)

  monkeypatch.setattr(train_lib, "log_interval", log_interval)
  monkeypatch.setattr(train_lib, "compile_eval_step", lambda *a, **k: compiles.append(1) or real_compile(*a, **k))
  monkeypatch.setattr(Checkpointer, "save", save)
  monkeypatch.setattr(Checkpointer, "wait", wait)
  vmap.train_points([with_values(base, seed=k) for k in range(4)], [str(tmp_path / str(k)) for k in range(4)])
  # 4 stacked states (+ a step's metrics), and while a checkpoint is written its slice and orbax's copy of it
  assert (live["peak"] - live["baseline"]) / state_bytes < 6.5
  assert most_in_flight[0] == 1  # (the final checkpoints too: the stage ends with a save at step 4)
  assert len(compiles) == 1
