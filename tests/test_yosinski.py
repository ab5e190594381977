"""The Yosinski et al. 2014 reproduction (configs/cifar10_yosinski.py, experiments/yosinski/plot.py): class splits,
the 2 + 4N stages and their init_from/dont_load/freeze settings, what a transfer network really starts from, the
sweep's points, and the Figure 2 plot from a hand-written results.csv."""

from __future__ import annotations

import csv
import json
import os

import jax
import numpy as np
import pytest

import conftest
from conftest import REPO, load_script
from finetune.checkpoint import read_checkpoint_arrays, resolve_checkpoint
from finetune.config import load_config, ordered_keys, stage_configs
from finetune.errors import FinetuneError
from finetune.partition import flatten
from finetune.sweep import load_sweep

CONFIG = str(REPO / "configs" / "cifar10_yosinski.py")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
VEHICLES = ("airplane", "automobile", "ship", "truck")
ANIMALS = ("bird", "cat", "deer", "dog", "frog", "horse")
GROUPS = {"reduced": ("stem", "stage_1", "stage_2", "stage_3"),
          "full": ("stem", "stage_1", "stage_2", "stage_3", "stage_4"),
          "tiny": ("stem", "stage_1", "stage_2")}
GROUP_REGEX = {"stem": "^stem/", **{f"stage_{i + 1}": f"^stages/{i}/" for i in range(5)}}


def _stage_names(ns):
  return ["baseA", "baseB"] + [f"{c}_{n}" for n in ns for c in ("BnB", "BnB_plus", "AnB", "AnB_plus")]


# ------------------------------------------------------------------------------------------------ the config


@pytest.mark.parametrize("scale", ["reduced", "full"])
@pytest.mark.parametrize("split", ["random", "manmade"])
def test_config_has_both_bases_and_four_conditions_for_every_n(scale, split):
  config = load_config(f"{CONFIG}:scale={scale},split={split}", ["seed=3"])
  groups = GROUPS[scale]
  assert ordered_keys(config.stages) == _stage_names(range(1, len(groups) + 1))
  stages = dict(stage_configs(config))
  classes_a, classes_b = tuple(stages["baseA"].data.classes), tuple(stages["baseB"].data.classes)
  assert not set(classes_a) & set(classes_b) and set(classes_a) | set(classes_b) == set(CLASSES)
  if split == "manmade":
    assert (classes_a, classes_b) == (VEHICLES, ANIMALS)
  else:
    assert len(classes_a) == len(classes_b) == 5
  assert stages["baseA"].init_from == stages["baseB"].init_from == ""
  assert stages["baseA"].seed == 3 and stages["baseB"].seed == 503  # (each base from its own random weights)
  for n in range(1, len(groups) + 1):
    for condition in ("BnB", "BnB_plus", "AnB", "AnB_plus"):
      cfg = stages[f"{condition}_{n}"]
      assert tuple(cfg.data.classes) == classes_b  # every transfer network trains on B
      assert cfg.init_from == f"stage:base{condition[0]}"
      # The groups above n and the head are re-initialised; exactly the model's own group regexes.
      assert tuple(cfg.dont_load) == tuple(GROUP_REGEX[g] for g in groups[n:]) + ("^head/",)
      assert cfg.freeze.first_n == (0 if condition.endswith("_plus") else n)
      assert cfg.seed == 1003 and not cfg.train.evaluate_sources
      assert cfg.train.steps == stages["baseB"].train.steps  # as long as the bases, as in the paper


def test_random_splits_are_disjoint_five_five_and_fixed_by_split_seed():
  def split(split_seed):
    stages = dict(stage_configs(load_config(f"{CONFIG}:scale=reduced,split_seed={split_seed},ns=1")))
    return tuple(stages["baseA"].data.classes), tuple(stages["baseB"].data.classes)

  splits = [split(s) for s in range(4)]
  for classes_a, classes_b in splits:
    assert len(classes_a) == len(classes_b) == 5 and set(classes_a) | set(classes_b) == set(CLASSES)
    assert list(classes_a) == sorted(classes_a, key=CLASSES.index)  # class-index order
  assert split(2) == splits[2]  # deterministic
  assert len(set(splits)) == 4  # the split seed chooses the split
  yosinski = load_script("configs/cifar10_yosinski.py")
  assert yosinski.class_split("random", 1) == splits[1]
  assert yosinski.class_split("manmade", 7) == (VEHICLES, ANIMALS)


def test_arguments_subsets_and_errors():
  stages = dict(stage_configs(load_config(f"{CONFIG}:ns=1+3,steps=40,target_steps=20", [
      "stages.AnB_plus_3.optimizer.learning_rate=1e-4"])))
  assert list(stages) == _stage_names([1, 3])
  assert stages["baseA"].train.steps == 40 and stages["AnB_3"].train.steps == 20
  assert stages["AnB_plus_3"].optimizer.learning_rate == 1e-4  # stage names work in overrides
  for bad, message in (("split=animals", "unknown :split"), ("scale=huge", "unknown :scale"),
                       ("ns=0+2", "1..4"), ("ns=a", "'\\+'-separated"), ("splt=random", "unknown config argument")):
    with pytest.raises(FinetuneError, match=message):
      load_config(f"{CONFIG}:{bad}")


# ----------------------------------------------------------------------------------- what a transfer net starts from


def test_transfer_network_copies_the_first_n_groups_and_freezes_exactly_them(tmp_path):
  from finetune.train import build_stage, initial_state, run_stage  # pylint: disable=g-import-not-at-top
  data = conftest.shared_data("cifar10")
  stages = dict(stage_configs(load_config(f"{CONFIG}:scale=tiny,ns=2,data_path={data}")))
  workdir, n, groups = str(tmp_path), 2, GROUPS["tiny"]
  run_stage(stages["baseA"], os.path.join(workdir, "baseA"), workdir, "baseA")  # 2 steps
  base = read_checkpoint_arrays(resolve_checkpoint("stage:baseA", workdir))
  base_stage = build_stage(stages["baseA"])
  base_init = flatten(jax.device_get(base_stage.init_state(0)(jax.random.PRNGKey(stages["baseA"].seed)).params))

  for name in ("AnB_2", "AnB_plus_2", "BnB_2", "BnB_plus_2"):
    cfg = stages[name]
    stage = build_stage(cfg)
    strategy = stage.strategy
    assert strategy.groups == (*groups, "head")
    expect_frozen = set(groups[:n]) if not name.endswith("_plus_2") else set()
    assert strategy.frozen == {p for p, g in strategy.group_of.items() if g in expect_frozen}
    # Each copies from its own base, and the same groups (the loading below is checked on the A-sourced ones).
    assert cfg.init_from == f"stage:base{name[0]}" and cfg.dont_load == stages["AnB_2"].dont_load
    if not name.startswith("AnB"):
      continue  # (baseB was not trained here; its initial state is the same code path)
    state, report = initial_state(stage, cfg, workdir)
    params = flatten(jax.device_get(stage.layout.view(state.params)))
    model_state = flatten(jax.device_get(stage.layout.view(state.model_state)))
    assert set(report["fresh"]) == {p for p in params if strategy.group_of[p] not in groups[:n]}
    assert report["fresh_stats"] and all(not p.startswith(("stem/", "stages/0/")) for p in report["fresh_stats"])
    for path, value in params.items():
      copied = strategy.group_of[path] in groups[:n]
      assert np.array_equal(value, base["params"][path]) == copied, path
      if not copied and path.endswith("kernel"):
        # Re-initialised from the transfer networks' own seed, not from the values baseA started from.
        assert not np.array_equal(value, base_init[path]), path
    for path, value in model_state.items():  # BatchNorm statistics follow their group
      copied = path.split("/")[0] == "stem" or path.startswith("stages/0/")
      assert np.array_equal(value, base["model_state"][path]) == copied, path
  # The two base networks start from their own random weights. (They shared one seed: AnB and BnB copied lower
  # layers that had started equal and, after 500 steps, were still near copies: cosine 0.98 in the stem.)
  base_b_init = flatten(jax.device_get(build_stage(stages["baseB"]).init_state(0)(
      jax.random.PRNGKey(stages["baseB"].seed)).params))
  for path, value in base_init.items():
    if path.endswith("kernel"):
      assert not np.array_equal(value, base_b_init[path]), path


# ------------------------------------------------------------------------------------------------------ sweep


def test_sweep_points_all_load():
  reduced = load_sweep(f"{CONFIG}:scale=reduced")
  assert [p.values for p in reduced] == [
      {":split": "random", ":split_seed": 0, "seed": 0}, {":split": "random", ":split_seed": 1, "seed": 0},
      {":split": "manmade", "seed": 0}]
  assert [p.name for p in reduced] == ["split=random,split_seed=0,seed=0", "split=random,split_seed=1,seed=0",
                                       "split=manmade,seed=0"]
  assert all(p.config_spec.startswith(f"{CONFIG}:scale=reduced,") for p in reduced)
  assert all(list(p.stage_dirs) == _stage_names(range(1, 5)) for p in reduced)
  full = load_sweep(f"{CONFIG}:scale=full")
  assert len(full) == 18 and len({p.name for p in full}) == 18
  assert {(p.values[":split"], p.values.get(":split_seed"), p.values["seed"]) for p in full} == {
      *((("random", s, k) for s in range(5) for k in range(3))), *((("manmade", None, k) for k in range(3)))}


# ------------------------------------------------------------------------------------------------------- plot


def test_plot_summarizes_and_draws_figure2(tmp_path):
  pytest.importorskip("matplotlib")
  plot = load_script("experiments/yosinski/plot.py")
  stages = ["baseA", "baseB"] + [f"{c}_{n}" for n in (1, 2) for c in ("BnB", "BnB_plus", "AnB", "AnB_plus")]
  header = ["point", ":split", ":split_seed", "seed", "status", *(f"{s}/test/accuracy" for s in stages)]

  def row(name, split, split_seed, seed, status, offset):
    values = {s: 0.5 + 0.01 * i + offset for i, s in enumerate(stages)}
    if status != "finished":
      return [name, split, split_seed, seed, status, *([""] * len(stages))]
    return [name, split, split_seed, seed, status, *(values[s] for s in stages)]

  path = tmp_path / "results.csv"
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerow(row("split=random,split_seed=0,seed=0", "random", "0", "0", "finished", 0.0))
    writer.writerow(row("split=random,split_seed=1,seed=0", "random", "1", "0", "finished", 0.1))
    writer.writerow(row("split=random,split_seed=1,seed=1", "random", "1", "1", "finished", 0.14))
    writer.writerow(row("split=random,split_seed=2,seed=0", "random", "2", "0", "incomplete", 0.0))
    writer.writerow(row("split=manmade,seed=0", "manmade", "", "0", "finished", 0.2))
  summary = plot.summarize(str(path))
  assert list(summary) == ["random", "manmade"]
  random = summary["random"]
  # split 1's two seeds (offsets 0.1, 0.14) are averaged first: the splits count once each, at 0.51 and 0.63
  assert random["baseB"].count == 2 and random["baseB"].mean == pytest.approx(0.57)
  assert random["baseB"].std == pytest.approx(np.std([0.51, 0.63], ddof=1))
  assert sorted(random["AnB+"]) == [1, 2] and random["AnB+"][2].mean == pytest.approx(0.5 + 0.01 * 9 + 0.06)
  assert summary["manmade"]["BnB"][1].values == (pytest.approx(0.72),)
  assert "AnB+" in plot.table(summary)
  per_split = plot.summarize(str(path), per_split_seed=True)
  assert list(per_split) == ["random split_seed=0", "random split_seed=1", "manmade"]
  assert per_split["random split_seed=1"]["baseB"].values == (pytest.approx(0.61), pytest.approx(0.65))
  lines = plot.markdown(summary).splitlines()
  assert lines[0] == "| split | network | n = 1 | n = 2 |" and len(lines) == 2 + 4 * 2
  assert lines[2] == (f"| random (baseA 0.5600 ± {np.std([0.50, 0.62], ddof=1):.4f}, baseB 0.5700 ± "
                      f"{np.std([0.51, 0.63], ddof=1):.4f}; runs: 2) | BnB | 0.5800 ± 0.0849 | 0.6200 ± 0.0849 |")
  assert lines[6].startswith("| manmade (baseA 0.7000, baseB 0.7100; runs: 1) | BnB | 0.7200 |")
  png = tmp_path / "figure2.png"
  fig = plot.figure2(str(path), str(png), title="test")
  assert png.stat().st_size > 1000 and len(fig.axes) == 2
  fig = plot.figure2(str(path), per_split_seed=True)  # one panel per class split, bars over its seeds
  assert [ax.get_title() for ax in fig.axes] == ["random class split 0", "random class split 1",
                                                 "man-made (A) vs natural (B)"]
  with pytest.raises(ValueError, match="no finished points"):
    bad = tmp_path / "empty.csv"
    bad.write_text(",".join(header) + "\n")
    plot.summarize(str(bad))


def test_plot_reads_the_results_csv_that_sweep_aggregate_writes(tmp_path):
  """The real format end to end, without training: stage folders with summary.json as `finetune train` leaves them,
  tabulated by `finetune.sweep.aggregate`, read back by `summarize`."""
  pytest.importorskip("matplotlib")
  from finetune.config import to_json  # pylint: disable=g-import-not-at-top
  from finetune.sweep import aggregate  # pylint: disable=g-import-not-at-top
  plot = load_script("experiments/yosinski/plot.py")
  points = load_sweep(f"{CONFIG}:scale=tiny")
  for index, point in enumerate(points):
    for name, stage_cfg in stage_configs(point.config):
      run_dir = tmp_path / point.name / point.stage_dirs[name]
      run_dir.mkdir(parents=True)
      (run_dir / "config.json").write_text(to_json(stage_cfg))
      accuracy = 0.25 if name.startswith("AnB_") else 0.5 + 0.1 * index
      (run_dir / "summary.json").write_text(f'{{"final": {{"test": {{"accuracy": {accuracy}}}}}}}')
  table = aggregate(points, str(tmp_path), ["test/accuracy"])
  assert "AnB_plus_3/test/accuracy" in table
  summary = plot.summarize(str(tmp_path / "results.csv"))
  assert list(summary) == ["random", "manmade"]
  assert summary["random"]["baseB"].values == (pytest.approx(0.5), pytest.approx(0.6))
  assert summary["random"]["AnB"][3].mean == pytest.approx(0.25) and sorted(summary["manmade"]["BnB+"]) == [1, 2, 3]
  plot.figure2(str(tmp_path / "results.csv"), str(tmp_path / "figure2.png"))
  assert (tmp_path / "figure2.png").exists()


@pytest.mark.slow
def test_smallest_sweep_point_trains_all_conditions_and_plots(tmp_path, capsys):
  """`scale=tiny,ns=1`'s first point (a random split) end to end: baseA, baseB and the four n = 1 networks trained
  by the command `--dry-run` prints, tabulated by `--aggregate-only`, drawn by plot.py."""
  data = conftest.shared_data("cifar10")
  results = conftest.run_first_sweep_point(capsys, f"{CONFIG}:scale=tiny,ns=1,data_path={data}", tmp_path / "sweep",
                                           "test/accuracy")
  with open(results, newline="") as f:
    rows = list(csv.DictReader(f))
  assert [row["status"] for row in rows] == ["finished", "incomplete", "incomplete"]
  names = ["baseA", "baseB", "BnB_1", "BnB_plus_1", "AnB_1", "AnB_plus_1"]
  for name in names:  # each network scored on its whole test split: right answers / its size
    (summary_path,) = (tmp_path / "sweep").glob(f"*/{name}/summary.json")
    test = json.loads(summary_path.read_text())["final"]["test"]
    correct = float(rows[0][f"{name}/test/accuracy"]) * test["num_examples"]
    assert test["num_examples"] > 0 and test["accuracy"] == pytest.approx(float(rows[0][f"{name}/test/accuracy"]))
    assert 0 <= round(correct) <= test["num_examples"] and correct == pytest.approx(round(correct)), (name, test)
  plot = load_script("experiments/yosinski/plot.py")
  summary = plot.summarize(str(results))
  assert list(summary) == ["random"] and summary["random"]["AnB+"][1].mean == pytest.approx(
      float(rows[0]["AnB_plus_1/test/accuracy"]))
  plot.figure2(str(results), str(tmp_path / "figure2.png"))
  assert (tmp_path / "figure2.png").stat().st_size > 0


def test_full_grid_estimate_sums_every_stage_of_every_point(tmp_path, capsys):
  """benchmarks/yosinski_full_estimate.py over the config's full grid: 18 points x (2 bases + 4 conditions x 5 n)
  x 4,000 steps of 128, the n = 2..4 step times interpolated between n = 1 and n = 5."""
  estimate = load_script("benchmarks/yosinski_full_estimate.py")
  # Every stage at 128 examples/s = 1 s/step, except the frozen n = 5 stages at 256/s (0.5 s/step).
  stages = {"baseA": 128, "baseB": 128}
  for condition in ("BnB", "BnB_plus", "AnB", "AnB_plus"):
    stages[f"{condition}_1"] = 128
    stages[f"{condition}_5"] = 256 if condition in ("BnB", "AnB") else 128
  for name, rate in stages.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / "summary.json").write_text(json.dumps({"train_examples_per_s": rate}))
  estimate.main(str(tmp_path))
  # Per point: bases 2 x 4000 s; BnB+ and AnB+ 5 x 4000 s each; BnB and AnB: n=1..5 at 1, 0.875, 0.75, 0.625,
  # 0.5 s/step, so 3.75 x 4000 s each. Total per point 4000 x 19.5 s; 18 points = 390 h.
  assert "about 390.0 h" in capsys.readouterr().out
  # Without AnB_5, AnB_2..4 have nothing above them to interpolate from.
  (tmp_path / "AnB_5" / "summary.json").unlink()
  with pytest.raises(SystemExit, match="stage AnB_2 was not run"):
    estimate.main(str(tmp_path))
  (tmp_path / "baseA" / "summary.json").unlink()  # a base network has no n to interpolate from
  with pytest.raises(SystemExit, match="stage baseA was not run .* run the whole config"):
    estimate.main(str(tmp_path))
