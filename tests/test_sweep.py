"""Sweeps: get_sweep points, their names and commands, running them as `finetune train`, skipping finished ones,
reporting failures, aggregating over seeds, and the wandb grid definition."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from finetune import cli
from finetune import config as config_lib
from finetune import files
from finetune.errors import FinetuneError
from finetune import sweep
from finetune.sweep import aggregate, load_sweep, point_names, product, seeds, zipped

CONFIG = '''
from finetune.config import parse_arg
from finetune.sweep import product, seeds, zipped

def get_config(arg=None):
  args = parse_arg(arg, steps=3)
  return dict(model=dict(name="mlp", input_size=64, hidden=(16,)),
              data=dict(name="digits", batch_size=32, eval_batch_size=64, eval_splits=("validation",)),
              train=dict(steps=args.steps, log_every=1, checkpoint_every=0){extra})

def get_sweep(arg=None):
  return {sweep}
'''

TWO_STAGES = ''',
              stages=dict(pre=dict(data=dict(classes=(0, 1, 2, 3, 4))),
                          ft=dict(data=dict(classes=(5, 6, 7, 8, 9)), init_from="stage:pre", dont_load=("^head/",)))'''


def write_config(tmp_path, sweep: str, extra: str = "", name: str = "swept.py") -> str:
  path = tmp_path / name
  path.write_text(CONFIG.format(sweep=sweep, extra=extra))
  return str(path)


def sweep_cli(capsys, *argv) -> tuple[int, str, str]:
  status = cli.main(["sweep", *argv])
  captured = capsys.readouterr()
  return status, captured.out, captured.err


def read_csv(path) -> list[dict[str, str]]:
  with open(path) as f:
    return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------ expansion


def test_product_zipped_seeds_and_their_combination():
  assert product({"optimizer.learning_rate": [1e-3, 1e-2]}, seeds(2)) == [
      {"optimizer.learning_rate": 1e-3, "seed": 0}, {"optimizer.learning_rate": 1e-3, "seed": 1},
      {"optimizer.learning_rate": 1e-2, "seed": 0}, {"optimizer.learning_rate": 1e-2, "seed": 1}]
  assert product({"a.x": [1, 2], "a.y": ["p", "q"]}) == product({"a.x": [1, 2]}, {"a.y": ["p", "q"]})
  assert product(seed=[3, 4]) == seeds([3, 4]) == [{"seed": 3}, {"seed": 4}]
  assert product() == [{}]
  assert seeds(2, key="data.seed") == [{"data.seed": 0}, {"data.seed": 1}]
  assert seeds(None, default=2) == seeds(2) and seeds((5,), default=2) == [{"seed": 5}]  # an unset :seeds= argument
  assert zipped({"optimizer.learning_rate": [1e-3, 1e-2], "train.steps": [400, 100]}) == [
      {"optimizer.learning_rate": 1e-3, "train.steps": 400}, {"optimizer.learning_rate": 1e-2, "train.steps": 100}]
  combined = product(zipped({"a": [1, 2], "b": [3, 4]}), seeds(3))
  assert len(combined) == 6
  assert combined[0] == {"a": 1, "b": 3, "seed": 0} and combined[5] == {"a": 2, "b": 4, "seed": 2}
  assert zipped(seeds(2), [{"a": 5}, {"a": 6}]) == [{"seed": 0, "a": 5}, {"seed": 1, "a": 6}]


def test_bad_axes_are_errors():
  with pytest.raises(FinetuneError, match="zipped.* needs parts of equal length: optimizer.learning_rate has 3, "
                     "train.steps has 2"):
    zipped({"optimizer.learning_rate": [1e-3, 3e-3, 1e-2], "train.steps": [400, 100]})
  with pytest.raises(FinetuneError, match="sweep axis 'seed' needs a list of values, got 3"):
    product({"seed": 3})
  with pytest.raises(FinetuneError, match="sweep key 'seed' is set twice in one point"):
    product(seeds(2), seeds(2))
  with pytest.raises(FinetuneError, match="a sweep part must be a list of points"):
    product([1, 2])
  with pytest.raises(FinetuneError, match="seeds: 0 seeds gives no points"):
    seeds(0)
  for bad in ((1, 1), (1, "2"), (), (True,), "3", 2.0):
    with pytest.raises(FinetuneError, match="seeds: expected a count .* or distinct integer seeds"):
      seeds(bad)


def test_point_names_are_readable_unique_and_deterministic():
  points = product({"optimizer.learning_rate": [1e-3, 3e-3]}, seeds(2))
  assert point_names(points) == ["learning_rate=0.001,seed=0", "learning_rate=0.001,seed=1",
                                 "learning_rate=0.003,seed=0", "learning_rate=0.003,seed=1"]
  assert point_names(points) == point_names([dict(p) for p in points])
  # Keys keep as much of their path as tells them apart; config-file arguments lose their ':'.
  assert point_names([{"train.steps": 1, "stages.ft.train.steps": 2, ":variant": "ewc"}]) == [
      "train.steps=1,ft.train.steps=2,variant=ewc"]
  assert point_names([{"data.classes": (0, 1)}, {}]) == ["classes=_0,1_", "default"]
  # Sanitising can make two names equal: both then end in a hash of their values.
  clashing = point_names([{"data.path": "a/b"}, {"data.path": "a b"}])
  assert clashing[0] != clashing[1] and all(name.startswith("path=a_b-") for name in clashing)
  long = point_names([{"data.path": "/very/long/" + "x" * 100}, {"data.path": "/very/long/" + "x" * 101}])
  assert all(len(name) == 69 for name in long) and long[0] != long[1]
  assert long == point_names([{"data.path": "/very/long/" + "x" * 100}, {"data.path": "/very/long/" + "x" * 101}])


def test_load_sweep_validates_every_point_before_anything_runs(tmp_path, capsys):
  def error(sweep: str) -> str:
    with pytest.raises(FinetuneError) as e:
      load_sweep(write_config(tmp_path, sweep))
    return str(e.value)

  assert "sweep point learnin_rate=0.1: unknown config key 'optimizer.learnin_rate' (did you mean " \
         "'optimizer.learning_rate'?)" in error('[{"seed": 1}, {"optimizer.learnin_rate": 0.1}]')
  assert "sweep point seed=-1: config.seed must be >= 0" in error("seeds([1, -1])")
  assert "get_sweep in" in error('{"seed": [0, 1]}') and "must return a list of dicts" in error('{"seed": 1}')
  assert "point 1 is 'seed=1', not a dict" in error('[{"seed": 0}, "seed=1"]')
  assert "returned no points" in error("[]")
  # seed 0 is the default: the two points are one experiment.
  assert "sweep points seed=0 and default (entries 0 and 1 of get_sweep's list, from 0) resolve to the same config; " \
         "drop one" in error('[{"seed": 0}, {}]')
  # Equal entries share a name: their positions tell them apart.
  assert "sweep points seed=1-" in error('[{"seed": 0}, {"seed": 1}, {"seed": 1}]') and \
      "(entries 1 and 2 of get_sweep's list, from 0)" in error('[{"seed": 0}, {"seed": 1}, {"seed": 1}]')
  assert "ignored its argument" not in error('[{":steps": "x"}]')  # a wrong :arg value is the config's error
  assert "expects int" in error('[{":steps": "x"}]')
  no_sweep = tmp_path / "plain.py"
  no_sweep.write_text("def get_config(arg=None):\n  return {}\n")
  status, _, err = sweep_cli(capsys, "--config", str(no_sweep), "--workdir", str(tmp_path / "w"))
  assert status == 2 and err.count("\n") == 1
  assert err.startswith(f"finetune: error: config file {no_sweep} has no get_sweep(arg=None) function")
  assert not (tmp_path / "w").exists()


def test_an_override_of_a_key_the_points_set_is_refused(tmp_path):
  """(The point's value came after the command line's and replaced it silently.)"""
  path = write_config(tmp_path, 'product({"optimizer.learning_rate": [0.1, 0.2]}, seeds(2))')
  for override, key, swept in (("seed=5", "seed", "seed"),
                                ("optimizer.learning_rate=0.5", "optimizer.learning_rate", "optimizer.learning_rate"),
                                ("optimizer={'learning_rate': 0.5}", "optimizer", "optimizer.learning_rate")):
    with pytest.raises(FinetuneError, match=rf"--config.{re.escape(key)} would not reach the points: the sweep sets "
                                            rf"{re.escape(swept)} in each of them"):
      load_sweep(path, [override])
  assert len(load_sweep(path, ["optimizer.weight_decay=0.01"])) == 4  # a key no point sets reaches them all


def test_an_override_of_a_value_the_points_arguments_vary_is_refused(tmp_path):
  """(The override gave every point one value: `--config.stages.ewc.regularize.ewc.weight=5` ran the `:ewc_weight`
  sweep's points at 5, under names that said 10 to 10000.)"""
  path = tmp_path / "args.py"
  path.write_text(CONFIG.replace("parse_arg(arg, steps=3)", "parse_arg(arg, steps=3, classes=(0, 1))")
                  .replace('batch_size=32,', 'batch_size=32, classes=args.classes,')
                  .format(sweep='product({":classes": [(0, 1, 2), (3, 4)]})', extra=""))
  with pytest.raises(FinetuneError, match=r"--config.data.classes gives points classes=_0,1,2_ and classes=_3,4_ one "
                                          r"value where their config-file arguments set \(0, 1, 2\) and \(3, 4\), so "
                                          r"they would run the same config; drop the override"):
    load_sweep(str(path), ["data.classes=(5, 6)"])
  assert [p.config.data.batch_size for p in load_sweep(str(path), ["data.batch_size=16"])] == [16, 16]
  # An override that makes every point valid, or one on a value the points differ in besides the swept one (as
  # MiniLM's `:task` sets validation_fraction), is taken as before.
  needs = tmp_path / "needs.py"
  needs.write_text(CONFIG.format(sweep="seeds(2)", extra="").replace(
      "checkpoint_every=0)", "checkpoint_every=0, eval_every=0, early_stopping=dict(metric='validation/accuracy', "
      "patience=1))"))
  assert len(load_sweep(str(needs), ["train.eval_every=1"])) == 2


def test_a_config_file_argument_a_point_replaces_is_refused(tmp_path):
  """(The point's `:key` replaced the command's silently: `:ewc_weight=5` ran the sweep's 10, 100 and 1000, and
  `:seed=5` ran the seed axis' seeds, which set the config key `seed`.)"""
  path = tmp_path / "args.py"
  path.write_text(CONFIG.replace("parse_arg(arg, steps=3)", "parse_arg(arg, steps=3, classes=(0, 1), seed=0)")
                  .replace('batch_size=32,', 'batch_size=32, classes=args.classes,')
                  .format(sweep='product({":classes": [(0, 1, 2), (3, 4)]}, seeds(2))', extra=""))
  with pytest.raises(FinetuneError, match=r":classes=\(5,6\) would not reach every point: get_sweep sets :classes in "
                                          r"point\(s\) classes=_0,1,2_,seed=0, .*; drop it, or choose"):
    load_sweep(f"{path}:steps=2,classes=(5,6)", [])
  with pytest.raises(FinetuneError, match=r":seed=5 would not reach every point: get_sweep sets seed in point"):
    load_sweep(f"{path}:seed=5", [])
  assert len(load_sweep(f"{path}:steps=2", [])) == 4  # an argument no point sets reaches them all


def test_a_point_drops_a_command_argument_it_does_not_read(tmp_path, capsys):
  """A variant whose get_config refuses an argument the other points read (ULMFiT's scratch baseline and the
  language-model steps) sets it NOT_READ: the command's value reaches the others and is left out of its `:arg`."""
  path = write_config(tmp_path, '[{":steps": NOT_READ, "seed": 0}, {"seed": 1}]')
  path = tmp_path / "swept.py"
  path.write_text(path.read_text().replace("from finetune.sweep import", "from finetune.sweep import NOT_READ,"))
  first, second = load_sweep(f"{path}:steps=2")
  assert first.name == "seed=0" and first.values == {"seed": 0} and first.not_read == {"steps"}
  assert (first.config.train.steps, second.config.train.steps) == (3, 2)
  assert first.config_spec == str(path) and second.config_spec == f"{path}:steps=2"
  status, out, err = sweep_cli(capsys, "--config", f"{path}:steps=2", "--workdir", str(tmp_path / "w"), "--dry-run")
  assert status == 0, err
  assert [shlex.split(line)[3] for line in out.splitlines() if line.startswith("finetune train")] == \
      [str(path), f"{path}:steps=2"]
  # No one base spec serves both points, so a wandb sweep names each point (`only`).
  assert sweep.wandb_sweep([first, second], str(tmp_path / "w"))["parameters"] == {
      "only": {"values": ["seed=0", "seed=1"]}}
  with pytest.raises(FinetuneError, match=r"point 0 sets seed to NOT_READ, which only a config-file argument takes"):
    path.write_text(path.read_text().replace('{":steps": NOT_READ, "seed": 0}', '{"seed": NOT_READ}'))
    load_sweep(str(path))


def test_dry_run_prints_commands_that_finetune_train_accepts(tmp_path, capsys):
  path = write_config(tmp_path, '''product({"optimizer.schedule": ["constant", "cosine"], "data.classes": [(0, 1, 2)],
                                            ":steps": [4], "optimizer.learning_rate": [0.5],
                                            "wandb.name": ["True"]})''')
  workdir = tmp_path / "sweep dir"
  status, out, _ = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--dry-run",
                             "--config.train.log_every=2")
  assert status == 0 and not workdir.exists()  # a dry run writes nothing
  lines = out.strip().splitlines()
  points = load_sweep(path, ["train.log_every=2"])
  assert len(lines) == len(points) == 2
  for line, point in zip(lines, points):
    argv = shlex.split(line)
    assert argv[0] == "finetune"
    rest, overrides = cli.split_overrides(argv[1:])
    args = cli._parser().parse_args(rest)  # pylint: disable=protected-access
    assert args.command == "train" and args.workdir == str(workdir / point.name)
    config = config_lib.load_config(args.config, overrides)
    assert config_lib.to_json(config) == config_lib.to_json(point.config)
    assert config.train.steps == 4 and config.train.log_every == 2 and config.data.classes == (0, 1, 2)
    assert config.wandb.name == "True"  # a string that reads as another literal is quoted
  assert [config_lib.load_config(p.config_spec, p.overrides).optimizer.schedule for p in points] == [
      "constant", "cosine"]


def test_config_file_arguments_may_hold_commas_in_brackets_and_quotes(tmp_path, capsys):
  path = tmp_path / "args.py"
  path.write_text(CONFIG.replace("parse_arg(arg, steps=3)", "parse_arg(arg, steps=3, classes=(0, 1), tag='t')")
                  .replace('batch_size=32,', 'batch_size=32, classes=args.classes,')
                  .replace("{extra}", ", wandb=dict(name=args.tag)")
                  .format(sweep='product({":classes": [(0, 1, 2), (3, 4)]}, {":tag": ["a,b"]})'))
  status, out, _ = sweep_cli(capsys, "--config", f"{path}:steps=2", "--workdir", str(tmp_path / "w"), "--dry-run")
  assert status == 0
  configs = []
  for line in out.strip().splitlines():
    rest, overrides = cli.split_overrides(shlex.split(line)[1:])
    spec = cli._parser().parse_args(rest).config  # pylint: disable=protected-access
    configs.append(config_lib.load_config(spec, overrides))
  assert [(c.data.classes, c.wandb.name, c.train.steps) for c in configs] == [((0, 1, 2), "a,b", 2), ((3, 4), "a,b", 2)]


def test_config_file_argument_values_reach_the_config_exactly(tmp_path, capsys):
  """A `:key` value is written into the point's `file.py:arg` so that parse_arg reads back the same value: spaces
  kept, and strings with quotes, brackets, commas, edge spaces or a newline quoted (both quote kinds: adjacent
  literals), in load_sweep's points and in the --dry-run commands alike."""
  values = [("it's", ("hello world", "b")), ("x)", ("y",)), ('say "hi", it\'s', ("it's", 'c"d')), ("(", ()),
            ("True", ("a,b",)), (" spaced ", ("[",)), ("", ("}",)), ("new\nline", ("p q",)), ("plain", ("x",))]
  path = tmp_path / "args.py"
  path.write_text(CONFIG.replace("parse_arg(arg, steps=3)", "parse_arg(arg, steps=3, tag='t', tags=('x',))")
                  .replace("{extra}", ", wandb=dict(name=args.tag, tags=args.tags)")
                  .format(sweep=f"zipped({{':tag': {[t for t, _ in values]!r}, ':tags': {[t for _, t in values]!r}}})"))
  spec = f"{path}:steps=2"  # (a `:tag` of the command would be replaced by the points': refused)
  points = load_sweep(spec)
  assert [(p.config.wandb.name, p.config.wandb.tags) for p in points] == values
  assert all(config_lib.load_config(p.config_spec).wandb.name == name for p, (name, _) in zip(points, values))
  assert points[-1].config_spec == f"{path}:steps=2,tag=plain,tags=('x',)"  # a plain string stays bare
  status, out, _ = sweep_cli(capsys, "--config", spec, "--workdir", str(tmp_path / "w"), "--dry-run")
  assert status == 0
  read = []
  for line in out.strip().splitlines():
    rest, overrides = cli.split_overrides(shlex.split(line)[1:])
    line_spec = cli._parser().parse_args(rest).config  # pylint: disable=protected-access
    config = config_lib.load_config(line_spec, overrides)
    read.append((config.wandb.name, config.wandb.tags, config.train.steps))
  assert read == [(name, tags, 2) for name, tags in values]
  with pytest.raises(FinetuneError, match="sweep point steps=nan: sweep value nan of config-file argument ':steps' "
                     "has no `:steps=...` text that reads back as the same value"):
    load_sweep(write_config(tmp_path, '[{":steps": float("nan")}]'))


def test_an_error_inside_get_sweep_is_one_line(tmp_path, capsys):
  path = write_config(tmp_path, "seeds(1)")
  with open(path, "a") as f:
    f.write("\ndef get_sweep(arg=None):\n  raise RuntimeError('oops\\nsecond line')\n")
  status, _, err = sweep_cli(capsys, "--config", path, "--workdir", str(tmp_path / "w"))
  line = sum(1 for _ in open(path))  # the raise is the file's last line
  assert status == 2 and err == (f"finetune: error: {path}: get_sweep raised RuntimeError: oops second line "
                                 f"(at {path}:{line} in get_sweep)\n")
  assert not (tmp_path / "w").exists()
  with pytest.raises(FinetuneError, match="^seeds: 0 seeds gives no points"):  # the framework's own errors as they are
    load_sweep(write_config(tmp_path, "seeds(0)"))


def test_a_sweeps_own_arguments_choose_points_and_never_reach_them(tmp_path):
  path = tmp_path / "own.py"
  path.write_text(CONFIG.format(extra="", sweep="product({':steps': [4]}, seeds(args.seeds))").replace(
      "def get_sweep(arg=None):\n", "def get_sweep(arg=None):\n  args = sweep.parse_sweep_arg(arg, own=dict(seeds=1), "
      "steps=3)\n").replace("from finetune.sweep import", "from finetune import sweep\nfrom finetune.sweep import"))
  points = load_sweep(f"{path}:seeds=3")
  assert [p.values for p in points] == [{":steps": 4, "seed": s} for s in range(3)]
  assert {p.config_spec for p in points} == {f"{path}:steps=4"}  # `seeds` stripped
  with pytest.raises(FinetuneError, match="unknown config argument 'seed'"):
    load_sweep(f"{path}:seed=3")  # a typo of the sweep's own key is still an error
  with pytest.raises(FinetuneError, match="both the sweep's own and shared"):
    sweep.parse_sweep_arg("", own=dict(seeds=1), seeds=2)


def test_a_bare_word_in_a_sweep_argument_is_refused():
  """A bare word sets the first string argument: the sweep's (here `checkpoint`) need not be its points' (MiniLM's
  sweep read `:lora` as checkpoint=lora while each point read variant=lora)."""
  with pytest.raises(FinetuneError, match=r"sweep config argument 'lora' is not key=value; a sweep's arguments name "
                                          r"their key \(valid: checkpoint, task, seeds\)"):
    sweep.parse_sweep_arg("task=trec,lora", own=dict(seeds=None), checkpoint="", task="sst2")
  assert sweep.parse_sweep_arg("task=trec", own=dict(seeds=None), checkpoint="", task="sst2").task == "trec"
  with pytest.raises(FinetuneError, match=r"config argument 'task' has no value"):
    sweep.parse_sweep_arg("task", own=dict(seeds=None), checkpoint="", task="sst2")


def test_numpy_values_inside_tuples_reach_the_points_as_numbers(tmp_path):
  """(A tuple of numpy integers became one string, passed every check and failed only when the point ran.)"""
  path = tmp_path / "numbers.py"
  path.write_text(CONFIG.format(extra="", sweep='product({"data.classes": [tuple(np.arange(3)), (np.int64(4), 5)],'
                                ' "optimizer.learning_rate": list(np.array([1e-3]))})').replace(
      "from finetune.config import parse_arg", "import numpy as np\nfrom finetune.config import parse_arg"))
  points = load_sweep(str(path))
  assert [p.config.data.classes for p in points] == [(0, 1, 2), (4, 5)]
  assert [p.values["data.classes"] for p in points] == [(0, 1, 2), (4, 5)]
  assert all(p.config.optimizer.learning_rate == 1e-3 for p in points)
  assert "np." not in " ".join(sweep.dry_run_commands(points, str(tmp_path / "w")))


# ---------------------------------------------------------------------------------------------------- running


def test_sweep_runs_points_writes_results_and_skips_them_when_rerun(tmp_path, capsys):
  path = write_config(tmp_path, "seeds(2)")
  workdir = tmp_path / "sweep"
  status, out, err = sweep_cli(capsys, "--config", path, "--workdir", str(workdir))
  assert status == 0, (out, err)
  assert "[0/2 done, 0 failed] running seed=0" in out and "[2/2 done, 0 failed] finished seed=1 in" in out
  summaries = [json.loads((workdir / f"seed={s}" / "summary.json").read_text()) for s in (0, 1)]
  accuracies = [s["final"]["validation"]["accuracy"] for s in summaries]
  assert summaries[0]["steps"] == 3 and accuracies[0] != accuracies[1]  # two seeds really ran
  rows = read_csv(workdir / "results.csv")
  assert [(r["point"], r["seed"], r["status"]) for r in rows] == [("seed=0", "0", "finished"),
                                                                  ("seed=1", "1", "finished")]
  assert [float(r["train/validation/accuracy"]) for r in rows] == accuracies
  expected = f"{statistics.mean(accuracies):.4f} ± {statistics.stdev(accuracies):.4f}"
  table = ["| train/validation/accuracy | n |", "|---|---|", f"| {expected} | 2 |"]
  assert out.split("results:")[0].strip().splitlines()[-3:] == table
  assert (workdir / "results.md").read_text().strip().splitlines()[-3:] == table
  assert [p["name"] for p in json.loads((workdir / "points.json").read_text())] == ["seed=0", "seed=1"]
  assert (workdir / "seed=1" / "sweep.log").read_text().startswith(f"$ {sys.executable} -m finetune train")

  modified = [(workdir / f"seed={s}" / "summary.json").stat().st_mtime_ns for s in (0, 1)]
  status, out, _ = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--metric", "validation/loss")
  assert status == 0
  assert out.splitlines()[:2] == ["[1/2 done, 0 failed] skipped (finished) seed=0",
                                  "[2/2 done, 0 failed] skipped (finished) seed=1"]
  assert "running" not in out
  assert [(workdir / f"seed={s}" / "summary.json").stat().st_mtime_ns for s in (0, 1)] == modified
  assert [float(r["train/validation/loss"]) for r in read_csv(workdir / "results.csv")] == [
      s["final"]["validation"]["loss"] for s in summaries]
  # The same folder under another :arg holds another experiment: refused before anything runs or is written.
  written = {name: (workdir / name).read_bytes() for name in ("points.json", "results.csv", "results.md")}
  status, out, err = sweep_cli(capsys, "--config", path + ":steps=4", "--workdir", str(workdir))
  assert status == 2 and out == "" and err.count("\n") == 1
  assert err.startswith("finetune: error: sweep point seed=0 (and 1 more of the 2 points): ") and \
      "holds a run whose config differs (train.steps: 3 then, 4 now); use a new --workdir" in err
  assert {name: (workdir / name).read_bytes() for name in written} == written


def test_aggregate_only_tabulates_finished_points_and_runs_none(tmp_path, capsys):
  """Seeds run elsewhere are merged by copying their point folders into one sweep folder and tabulating it."""
  workdir = tmp_path / "sweep"
  status, out, err = sweep_cli(capsys, "--config", write_config(tmp_path, "seeds(1)"), "--workdir", str(workdir))
  assert status == 0, (out, err)
  more_seeds = write_config(tmp_path, "seeds(2)", name="more_seeds.py")
  status, out, err = sweep_cli(capsys, "--config", more_seeds, "--workdir", str(workdir), "--aggregate-only")
  assert status == 0, (out, err)
  assert "running" not in out and not (workdir / "seed=1").exists()
  assert [(r["point"], r["status"]) for r in read_csv(workdir / "results.csv")] == [("seed=0", "finished"),
                                                                                    ("seed=1", "incomplete")]
  assert "1 finished" in (workdir / "results.md").read_text()
  status, _, err = sweep_cli(capsys, "--config", more_seeds, "--workdir", str(workdir), "--aggregate-only", "--dry-run")
  assert status != 0 and "not allowed with argument --aggregate-only" in err
  status, _, err = sweep_cli(capsys, "--config", more_seeds, "--workdir", str(tmp_path / "none"), "--aggregate-only")
  assert status != 0 and "does not exist; run the sweep first" in err
  (tmp_path / "a_file").write_text("")
  status, _, err = sweep_cli(capsys, "--config", more_seeds, "--workdir", str(tmp_path / "a_file"), "--aggregate-only")
  assert status != 0 and "a_file is not a folder; run the sweep first" in err
  # Under another :arg the folder holds another experiment's runs: refused, not tabulated as incomplete over the
  # table of their own.
  written = {name: (workdir / name).read_bytes() for name in ("results.csv", "results.md")}
  status, out, err = sweep_cli(capsys, "--config", more_seeds + ":steps=4", "--workdir", str(workdir),
                               "--aggregate-only")
  assert status == 2 and out == "" and "sweep point seed=0: " in err and \
      "holds a run whose config differs (train.steps: 3 then, 4 now)" in err
  assert {name: (workdir / name).read_bytes() for name in written} == written
  status, _, err = sweep_cli(capsys, "--config", more_seeds, "--workdir", str(workdir), "--aggregate-only",
                             "--wandb-sweep", str(tmp_path / "sweep.yaml"))
  assert status != 0 and "--aggregate-only only tabulates" in err and not (tmp_path / "sweep.yaml").exists()


def test_parallel_sweep_continues_past_a_failed_point(tmp_path, capsys):
  # data.classes=(0, 99) passes config validation; the data pipeline rejects it when the run starts.
  path = write_config(tmp_path, '[{"seed": 0}, {"data.classes": (0, 99)}, {"seed": 1}]')
  workdir = tmp_path / "sweep"
  status, out, err = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--parallel", "2")
  assert status == 1
  bad = "classes=_0,99_"
  assert all(line.startswith("[0/3 done, 0 failed] running") for line in out.splitlines()[:2])  # two at once
  assert f"FAILED {bad} (exit status 2); last lines of {workdir / bad / 'sweep.log'}:" in out
  assert "    finetune: error: config.data.classes" in out  # the point's own one-line error
  assert "[3/3 done, 1 failed]" in out
  assert err.strip().splitlines() == [f"failed: {bad} (exit status 2); see {workdir / bad / 'sweep.log'}"]
  rows = read_csv(workdir / "results.csv")
  assert [(r["point"], r["status"]) for r in rows] == [("seed=0", "finished"), (bad, "incomplete"),
                                                       ("seed=1", "finished")]
  assert rows[1]["train/validation/accuracy"] == "" and rows[0]["train/validation/accuracy"]
  table = (workdir / "results.md").read_text()
  assert "| data.classes | train/validation/accuracy | n |" in table
  assert "| (0, 99) | - | 0 |" in table and "| - | " in table and " ± " in table
  # A mistyped metric fails before the failed point runs again (it was found after the sweep, which then skipped
  # naming its failed points).
  status, out, err = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--metric", "tset/accuracy")
  assert status == 2 and out == "" and "metric 'tset/accuracy' is a number in no stage summary" in err
  # With nothing finished beforehand it fails after the sweep, still naming the failed point.
  fresh = tmp_path / "fresh"
  status, out, err = sweep_cli(capsys, "--config", path, "--workdir", str(fresh), "--parallel", "2",
                               "--metric", "tset/accuracy")
  assert status == 2 and "[3/3 done, 1 failed]" in out
  assert err.splitlines()[0] == f"failed: {bad} (exit status 2); see {fresh / bad / 'sweep.log'}"
  assert "metric 'tset/accuracy' is a number in no stage summary" in err.splitlines()[1]


def test_vmap_sweep_trains_compatible_points_together(tmp_path, capsys):
  # Seeds and learning rates share a program; another class subset (other data) cannot, so it runs alone.
  path = write_config(tmp_path, '''[{"seed": 0}, {"seed": 1}, {"data.classes": (0, 1, 2)},
                                    {"optimizer.learning_rate": 0.01, "seed": 2}]''')
  workdir = tmp_path / "sweep"
  status, out, err = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--vmap", "4", "--dry-run",
                               "--config.train.log_every=3")
  lines = [shlex.split(line) for line in out.strip().splitlines()]
  names = [p.name for p in load_sweep(path)]
  assert status == 0 and len(lines) == 2
  # Why one trains apart (a fallback to a solo run said nothing).
  assert f"--vmap: {names[2]} trains apart from {names[0]}: data.classes differs ([] vs [0, 1, 2])" in err, err
  assert lines[0] == ["finetune", "sweep", "--config", path, "--workdir", str(workdir), "--together", names[0],
                      "--together", names[1], "--together", names[3], "--config.train.log_every=3"]
  assert lines[1][:2] == ["finetune", "train"] and lines[1][lines[1].index("--workdir") + 1] == str(workdir / names[2])
  for argv in lines:  # both parse as CLI invocations
    cli._parser().parse_args(cli.split_overrides(argv[1:])[0])  # pylint: disable=protected-access

  status, out, err = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--vmap", "4")
  assert status == 0, (out, err)
  assert f"running {names[0]}, {names[1]}, {names[3]} together (3 points, one program)" in out
  assert [r["status"] for r in read_csv(workdir / "results.csv")] == ["finished"] * 4
  assert f"-m finetune sweep --config {path}" in (workdir / names[0] / "sweep.log").read_text()
  assert "trained together with" in (workdir / names[1] / "sweep.log").read_text()
  # Each point's run folder is a complete `finetune train` run: re-running skips all four.
  status, out, _ = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--vmap", "4")
  assert status == 0 and out.count("skipped (finished)") == 4
  status, _, err = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--together", "nope")
  assert status == 2 and "no point named 'nope'" in err


def test_flags_a_mode_would_ignore_are_refused(tmp_path, capsys):
  """(--dry-run took --parallel -3, and --wandb-sweep/--together a --metric they never read.) --dry-run previews
  the command it is added to, so it takes --metric and --parallel."""
  path = write_config(tmp_path, "seeds(2)")
  workdir = str(tmp_path / "w")
  status, _, err = sweep_cli(capsys, "--config", path, "--workdir", workdir, "--dry-run", "--parallel", "-3")
  assert status == 2 and "--parallel -3: run at least one point at a time" in err
  status, out, _ = sweep_cli(capsys, "--config", path, "--workdir", workdir, "--dry-run", "--parallel", "2",
                             "--metric", "validation/accuracy")
  assert status == 0 and len(out.splitlines()) == 2
  for mode in (["--wandb-sweep", str(tmp_path / "w.yaml")], ["--together", "seed=0"]):
    status, _, err = sweep_cli(capsys, "--config", path, "--workdir", workdir, *mode, "--metric", "no/such")
    assert status == 2 and f"{mode[0]} neither runs points side by side nor tabulates them: drop --metric" in err
  assert not os.path.exists(workdir) and not (tmp_path / "w.yaml").exists()


def test_points_loaded_in_the_library_train_together_as_they_were_loaded(tmp_path):
  """(run_sweep and dry_run_commands took the sweep's spec and overrides as arguments of their own, defaulting to
  none: a library caller's group ran `--config ''`, or trained without the overrides the points were loaded with.)"""
  path = write_config(tmp_path, "seeds(2)")
  points = load_sweep(f"{path}", ["optimizer.learning_rate=0.5"])
  [line] = sweep.dry_run_commands(points, str(tmp_path / "w"), vmap=2)
  assert shlex.split(line) == ["finetune", "sweep", "--config", path, "--workdir", str(tmp_path / "w"),
                               "--together", "seed=0", "--together", "seed=1", "--config.optimizer.learning_rate=0.5"]


def test_together_connects_a_launcher_s_processes_first(tmp_path, capsys, monkeypatch):
  """(`--together` never called distributed.initialize: under a launcher each process trained the whole group
  alone, into the same folders.)"""
  from finetune import distributed, vmap  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(distributed, "initialize", lambda: calls.append("initialize"))
  monkeypatch.setattr(vmap, "train_points", lambda configs, dirs: calls.append(("train", len(configs))))
  path = write_config(tmp_path, "seeds(2)")
  names = [point.name for point in load_sweep(path)]
  status, _, err = sweep_cli(capsys, "--config", path, "--workdir", str(tmp_path / "w"), "--together", names[0],
                             "--together", names[1])
  assert status == 0, err
  assert calls == ["initialize", ("train", 2)]


def test_a_failed_group_points_at_the_log_holding_its_output_and_together_takes_no_dry_run(tmp_path, capsys):
  """(Each point of a failed --vmap group was sent to its own sweep.log, which holds only a pointer to the first
  point's; and --together with --dry-run trained instead of printing.)"""
  path = write_config(tmp_path, 'product({"data.classes": [(0, 99)]}, seeds(2))')
  workdir = tmp_path / "sweep"
  first, second = [p.name for p in load_sweep(path)]
  status, out, err = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--vmap", "2")
  assert status == 1 and "together (2 points, one program)" in out
  log = workdir / first / "sweep.log"
  assert err.strip().splitlines() == [f"failed: {name} (exit status 2); see {log}" for name in (first, second)]
  assert "finetune: error: " in log.read_text() and "config.data.classes has 99" in log.read_text()
  for flag in (["--dry-run"], ["--wandb-sweep", str(tmp_path / "sweep.yaml")]):
    status, out, err = sweep_cli(capsys, "--config", path, "--workdir", str(tmp_path / "t"), "--together", first,
                                 *flag)
    assert status == 2 and "--together trains the named points now" in err, err
    assert not (tmp_path / "t").exists() and not (tmp_path / "sweep.yaml").exists()


@pytest.mark.parametrize("how", ["SIGTERM to the sweep alone", "Ctrl-C to the process group"])
def test_a_signalled_sweep_stops_its_running_point(tmp_path, how):
  """(SIGTERM sent to the sweep's process only, as `kill PID` or a container stop sends it, left the running point
  training to its end: the sweep waited for it. A terminal's Ctrl-C reaches both; the point must still end once.)"""
  import contextlib  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  path = write_config(tmp_path, "seeds(2)")
  workdir = tmp_path / "sweep"
  command = [sys.executable, "-m", "finetune", "sweep", "--config", f"{path}", "--workdir", str(workdir),
             "--config.train.steps=1000000", "--config.train.log_every=100000"]
  # Its own session: the test signals its group alone; SIGINT back to the default (pytest-xdist workers ignore it).
  process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  log = workdir / "seed=0" / "sweep.log"
  while process.poll() is None and "parameters train at step 0" not in (log.read_text() if log.exists() else ""):
    time.sleep(0.1)  # until the point has begun
  if how.startswith("SIGTERM"):
    process.send_signal(signal.SIGTERM)
  else:
    os.killpg(process.pid, signal.SIGINT)
  try:
    out, err = process.communicate(timeout=120)  # (the point alone would train for hours)
  finally:  # (a failed test leaves nothing running: the sweep and its point share this group)
    with contextlib.suppress(ProcessLookupError):
      os.killpg(process.pid, signal.SIGKILL)
  assert process.returncode == 130, err[-3000:]
  assert err.strip().splitlines()[-1].startswith("finetune: interrupted"), err[-3000:]
  assert "FAILED" not in out and not (workdir / "seed=1").exists()  # nothing reported failed, nothing more started
  point_log = log.read_text()
  assert point_log.count("finetune: interrupted") == 1 and "Traceback" not in point_log, point_log[-3000:]
  assert not (workdir / "seed=0" / "summary.json").exists()


def fake_run(folder, point, summaries):
  """A finished run of `point` in `folder`, laid out as train_and_evaluate writes it (one summary per stage)."""
  for (stage, stage_cfg), summary in zip(config_lib.stage_configs(point.config), summaries):
    run_dir = folder / point.stage_dirs[stage]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config_lib.to_json(stage_cfg))
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize("extra, override, differs", [
    ("", "optimizer.learning_rate=0.5", "optimizer.learning_rate: 0.001 then, 0.5 now"),
    (TWO_STAGES, "stages.ft.train.steps=5", "train.steps: 3 then, 5 now")])
def test_a_changed_config_on_a_finished_sweep_is_refused_before_anything_is_written(tmp_path, capsys, extra,
                                                                                    override, differs):
  path = write_config(tmp_path, "seeds(2)", extra=extra)
  workdir = tmp_path / "sweep"
  points = load_sweep(path)
  summary = {"final": {"validation": {"accuracy": 0.5}}}
  for point in points:
    fake_run(workdir / point.name, point, [summary] * len(point.stage_dirs))
  status, out, err = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--parallel", "0")
  assert status == 2 and "--parallel 0: run at least one point at a time" in err
  status, out, err = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--vmap", "0")
  assert status == 2 and "--vmap 0: train at least one point per program" in err
  for mode in (["--aggregate-only"], ["--wandb-sweep", str(tmp_path / "w.yaml")], ["--together", "seed=0"]):
    status, out, err = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--vmap", "4", *mode)
    assert status == 2 and f"{mode[0]} does not group points into programs, so --vmap 4 would be ignored" in err
  assert sorted(os.listdir(workdir)) == ["seed=0", "seed=1"]  # (neither wrote points.json)
  status, out, _ = sweep_cli(capsys, "--config", path, "--workdir", str(workdir))
  assert status == 0 and out.count("skipped (finished)") == 2
  written = {name: (workdir / name).read_bytes() for name in ("points.json", "results.csv", "results.md")}
  files = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))

  status, out, err = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), f"--config.{override}")
  stage = "/ft" if extra else ""
  assert status == 2 and out == "" and err == (
      f"finetune: error: sweep point seed=0 (and 1 more of the 2 points): {workdir}/seed=0{stage} holds a run whose "
      f"config differs ({differs}); use a new --workdir, or restore the original value (nothing was run or "
      "written)\n")
  assert {name: (workdir / name).read_bytes() for name in written} == written
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == files  # no sweep.log, no new folder
  # A point whose folder holds no progressed run (here: none at all) may run under the new config.
  sweep.check_workdir(load_sweep(path, [override]), str(tmp_path / "elsewhere"))


def test_a_sweep_whose_points_gained_stages_is_refused_before_anything_is_written(tmp_path, capsys):
  """(Only the config was compared: a single-stage sweep re-run with stages added ran every point into train's
  layout refusal, and results.csv was overwritten with incomplete rows.)"""
  path = write_config(tmp_path, "seeds(2)")
  workdir = tmp_path / "sweep"
  for point in load_sweep(path):
    fake_run(workdir / point.name, point, [{"final": {"validation": {"accuracy": 0.5}}}])
  assert sweep_cli(capsys, "--config", path, "--workdir", str(workdir))[0] == 0
  written = (workdir / "results.csv").read_bytes()
  path = write_config(tmp_path, "seeds(2)", extra=TWO_STAGES)
  status, out, err = sweep_cli(capsys, "--config", path, "--workdir", str(workdir))
  assert status == 2 and out == "" and err == (
      f"finetune: error: sweep point seed=0 (and 1 more of the 2 points): {workdir}/seed=0 holds a single-stage run "
      "and this config has stages (pre, ft); use a new --workdir (nothing was run or written)\n")
  assert (workdir / "results.csv").read_bytes() == written
  assert not (workdir / "seed=0" / "pre").exists()


def test_aggregate_means_and_sample_stds_over_seeds(tmp_path):
  path = write_config(tmp_path, 'product({"optimizer.learning_rate": [0.1, 0.2]}, seeds(3))', extra=TWO_STAGES)
  points = load_sweep(path)
  workdir = tmp_path / "sweep"
  accuracies = {(0.1, 0): (0.5, 0.2), (0.1, 1): (0.7, 0.4), (0.1, 2): (0.9, 0.3), (0.2, 0): (0.4, 0.1)}
  def write_run(folder, point, summaries, older_run=False):  # as train_and_evaluate lays out a two-stage run
    for (stage, stage_cfg), summary in zip(config_lib.stage_configs(point.config), summaries):
      saved = json.loads(config_lib.to_json(stage_cfg))
      if older_run:  # a key added since (at its default) and a resumable key changed: still this experiment
        del saved["rehearsal"]
        saved["train"]["log_every"] = 99
      (folder / stage).mkdir(parents=True)
      (folder / stage / "config.json").write_text(json.dumps(saved))
      (folder / stage / "summary.json").write_text(json.dumps(summary))

  for point in points:
    key = (point.values["optimizer.learning_rate"], point.values["seed"])
    if key in accuracies:  # (the others did not run: incomplete)
      pre, ft = accuracies[key]
      write_run(workdir / point.name, point, [
          {"final": {"validation": {"accuracy": pre, "loss": 1.0}}, "steps": 3},
          {"final": {"validation": {"accuracy": ft, "loss": 1.0}}, "steps": 3,
           "forgetting": {"pre": {"validation": {"before": pre, "after": pre / 2, "drop": pre / 2}}}}],
                older_run=key == (0.1, 1))
  # A folder holding another experiment's run (seed 1's, under seed 2's name) is not that point's result.
  write_run(workdir / points[5].name, points[4], [{"final": {"validation": {"accuracy": 0.0}}}] * 2)

  table = aggregate(points, str(workdir), ["validation/accuracy", "forgetting/pre/validation/drop"])
  assert table.splitlines() == [
      "| optimizer.learning_rate | pre/validation/accuracy | ft/validation/accuracy | "
      "ft/forgetting/pre/validation/drop | n |",
      "|---|---|---|---|---|",
      "| 0.1 | 0.7000 ± 0.2000 | 0.3000 ± 0.1000 | 0.3500 ± 0.1000 | 3 |",
      "| 0.2 | 0.4000 | 0.1000 | 0.2000 | 1 |"]
  assert (workdir / "results.md").read_text().endswith(table + "\n")
  rows = read_csv(workdir / "results.csv")
  assert list(rows[0]) == ["point", "optimizer.learning_rate", "seed", "status", "pre/validation/accuracy",
                           "ft/validation/accuracy", "ft/forgetting/pre/validation/drop"]
  assert [r["status"] for r in rows] == ["finished"] * 4 + ["incomplete"] * 2
  assert float(rows[2]["ft/validation/accuracy"]) == 0.3 and rows[5]["pre/validation/accuracy"] == ""
  with pytest.raises(FinetuneError, match="metric 'validation/acuracy' is a number in no stage summary"):
    aggregate(points, str(workdir), ["validation/acuracy"])
  # A summary that is not UTF-8, or JSON of another shape, is a one-line error naming the file (was a traceback).
  summary = workdir / points[0].name / "pre" / "summary.json"
  for damage, message in ((b"\xff{}", "is damaged"), (b"{}", "is not a run summary")):
    summary.write_bytes(damage)
    with pytest.raises(FinetuneError, match=f"{summary}.*{message}"):
      aggregate(points, str(workdir))
  summary.write_text(json.dumps({"final": {"validation": {"accuracy": 0.5, "loss": 1.0}}, "steps": 3}))
  # Default metrics: every split's accuracy; grouping over another key.
  table = aggregate(points, str(workdir), seed_key="optimizer.learning_rate")
  assert table.splitlines()[0] == "| seed | pre/validation/accuracy | ft/validation/accuracy | n |"
  assert table.splitlines()[2] == "| 0 | 0.4500 ± 0.0707 | 0.1500 ± 0.0707 | 2 |"


def test_non_finite_and_missing_metrics_are_counted_in_their_cells(tmp_path, capsys):
  """A diverged seed's nan loss, an inf, and a run that reported no loss: each cell's mean and std are over the
  finite values it has, and says so, and nothing raises on the way (results.md is written)."""
  path = write_config(tmp_path, 'product({"optimizer.learning_rate": [0.1, 0.2, 0.3]}, seeds(3))')
  points = load_sweep(path)
  workdir = tmp_path / "sweep"
  nan, inf = float("nan"), float("inf")
  losses = [nan, 0.5, 0.7, 0.4, None, inf, nan, nan, -inf]
  for point, loss in zip(points, losses):
    final = {"accuracy": 0.5} if loss is None else {"accuracy": 0.5, "loss": loss}
    fake_run(workdir / point.name, point, [{"final": {"validation": final}}])
  status, out, err = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--aggregate-only",
                               "--metric", "validation/loss", "--metric", "validation/accuracy")
  assert status == 0, err
  table = ["| optimizer.learning_rate | train/validation/loss | train/validation/accuracy | n |",
           "|---|---|---|---|",
           "| 0.1 | 0.6000 ± 0.1414 (n=2, 1 nan) | 0.5000 ± 0.0000 | 3 |",
           "| 0.2 | 0.4000 (n=1, 1 inf) | 0.5000 ± 0.0000 | 3 |",
           "| 0.3 | 2 nan, -inf | 0.5000 ± 0.0000 | 3 |"]
  assert (workdir / "results.md").read_text().strip().splitlines()[-5:] == table
  assert [r["train/validation/loss"] for r in read_csv(workdir / "results.csv")] == [
      "nan", "0.5", "0.7", "0.4", "", "inf", "nan", "nan", "-inf"]
  mean, std = sweep.mean_std([nan, 0.5])  # (plot scripts: nan in, nan out, no exception)
  assert mean != mean and std != std and sweep.mean_std([inf, 1.0])[0] == inf


def test_seed_key_must_name_a_key_of_the_points(tmp_path, capsys):
  path = write_config(tmp_path, 'product({"optimizer.learning_rate": [0.1, 0.2]}, seeds(2))')
  workdir = tmp_path / "sweep"
  workdir.mkdir()
  status, _, err = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--aggregate-only",
                             "--seed-key", "sed")
  assert status == 2 and err == ("finetune: error: --seed-key 'sed' is no key of this sweep's points, so results.md "
                                 "would average nothing; pass one of: optimizer.learning_rate, seed\n")
  assert not os.listdir(workdir)
  assert aggregate(load_sweep(path), str(workdir), seed_key="optimizer.learning_rate").startswith("| seed | n |")
  # The default 'seed' serves a sweep without seeds too: a row per point.
  no_seeds = load_sweep(write_config(tmp_path, '[{"optimizer.learning_rate": 0.1}, {"optimizer.learning_rate": 0.2}]',
                                     name="no_seeds.py"))
  assert aggregate(no_seeds, str(workdir)).splitlines()[2:] == ["| 0.1 | 0 |", "| 0.2 | 0 |"]
  with pytest.raises(FinetuneError, match="--seed-key 'data.seed' .*; the points set no keys, so leave --seed-key out"):
    aggregate(load_sweep(write_config(tmp_path, "[{}]", name="none.py")), str(workdir), seed_key="data.seed")


def test_results_files_are_replaced_through_unique_temp_files(tmp_path, monkeypatch):
  """Two processes tabulating one sweep folder at once: each writes its own temp file, so neither moves the other's
  (half-written) into place, or fails to find its own. Simulated: another write lands inside this one's rename."""
  path, replace = str(tmp_path / "results.md"), os.replace
  def replace_after_another_write(source, target):
    monkeypatch.setattr(os, "replace", replace)
    files.write_text(path, "the other process's table\n")
    replace(source, target)
  monkeypatch.setattr(os, "replace", replace_after_another_write)
  files.write_text(path, "this table\n")
  assert (tmp_path / "results.md").read_text() == "this table\n"
  assert os.listdir(tmp_path) == ["results.md"] and (os.stat(path).st_mode & 0o777) == 0o644


# ------------------------------------------------------------------------------------------------------ wandb


SWEEP_FILES = sorted(p.name for p in (REPO / "configs").glob("*.py") if "def get_sweep" in p.read_text())


@pytest.mark.parametrize("name", SWEEP_FILES)
def test_every_config_files_sweep_loads(name):
  points = load_sweep(str(REPO / "configs" / name))
  assert points and len({p.name for p in points}) == len(points)


@pytest.mark.parametrize("name, arg, count, seed_values", [
    ("minilm_sst2.py", "task=trec,seeds=2,steps=10", 7 * 2, {0, 1}),
    ("cifar10_forgetting.py", "seeds=2,steps=5", 3 * 2, {0, 1}),
    ("mnist_forgetting.py", "seeds=(3,),steps=5", 4, {3}),
    ("cifar10_yosinski.py", "scale=reduced,seeds=(1,2),steps=5", 3 * 2, {1, 2}),
    ("ulmfit.py", "seeds=(2,),lm_steps=5", 1, {2})])
def test_seeds_argument_of_the_reproduction_sweeps(name, arg, count, seed_values):
  points = load_sweep(f"{REPO / 'configs' / name}:{arg}")
  assert len(points) == count and {p.values["seed"] for p in points} == seed_values
  assert all("seeds=" not in p.config_spec for p in points)
  # `steps` reaches every point but the probe, which refuses it (its steps are fixed)
  assert all(("steps=" in p.config_spec) == (p.values.get(":variant") != "linear_probe") for p in points)


def test_a_forgetting_sweep_of_one_variant_sweeps_its_strength_alone():
  """(`:variant=ewc` passed all four strengths to points that read one: 4 points, the others' values refused.)"""
  points = load_sweep(f"{REPO / 'configs' / 'mnist_forgetting.py'}:variant=ewc,seeds=1")
  assert [p.name for p in points] == [f"ewc_weight={w},seed=0" for w in (10.0, 100.0, 1000.0, 10000.0)]
  assert [list(p.stage_dirs) for p in points] == [["pretrain", "ewc"]] * 4
  assert len(load_sweep(f"{REPO / 'configs' / 'cifar10_forgetting.py'}:variant=finetune,seeds=2")) == 2


def test_seed_values_name_points_like_a_seed_count():
  """`:seeds=(1,2)` runs the same point folders as seeds 1 and 2 of `:seeds=3`, so results can be merged."""
  config = REPO / "configs" / "cifar10_yosinski.py"
  all_three = {p.name for p in load_sweep(f"{config}:scale=reduced,seeds=3")}
  later_two = {p.name for p in load_sweep(f"{config}:scale=reduced,seeds=(1,2)")}
  assert later_two < all_three and all_three - later_two == {p.name for p in load_sweep(f"{config}:scale=reduced")}


def test_results_csv_helpers_for_plot_scripts(tmp_path):
  path = tmp_path / "results.csv"
  path.write_text("point,seed,status,ft/test/accuracy\na,0,finished,0.5\nb,1,incomplete,\nc,2,finished,\n")
  rows = sweep.read_results(str(path))
  assert [row["point"] for row in rows] == ["a", "c"]  # finished rows only
  assert [sweep.number(row["ft/test/accuracy"]) for row in rows] == [0.5, None]
  assert sweep.mean_std([0.5]) == (0.5, 0.0)
  # sample std: squared deviations sum to 42/9, over n - 1 = 2
  assert sweep.mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, (7 / 3) ** 0.5))
  path.write_text("point,seed,status\na,0,failed\n")
  with pytest.raises(ValueError, match="has no finished points"):
    sweep.read_results(str(path))


def test_wandb_sweep_command_leaves_out_the_sweeps_own_arguments(tmp_path, capsys):
  """(The runs' command passed `:seeds=2` on to `finetune train`, whose get_config refused it: every run failed.)"""
  path = tmp_path / "own.py"
  path.write_text(CONFIG.format(extra="", sweep="product({'optimizer.learning_rate': [1e-3]}, seeds(args.seeds))")
                  .replace("def get_sweep(arg=None):\n", "def get_sweep(arg=None):\n  args = sweep.parse_sweep_arg("
                           "arg, own=dict(seeds=1), steps=3)\n")
                  .replace("from finetune.sweep import", "from finetune import sweep\nfrom finetune.sweep import"))
  out_file = tmp_path / "sweep.yaml"
  status, _, err = sweep_cli(capsys, "--config", f"{path}:seeds=2,steps=2", "--workdir", str(tmp_path / "w"),
                             "--wandb-sweep", str(out_file))
  assert status == 0, err
  run = yaml.safe_load(out_file.read_text())["command"][3].split("exec python -m finetune ", 1)[1]
  rest, overrides = cli.split_overrides(shlex.split(run.replace('"$@"', "--config.seed=1")))
  parsed = cli._parser().parse_args(rest)  # pylint: disable=protected-access
  assert parsed.config == f"{path}:steps=2"
  assert config_lib.load_config(parsed.config, overrides).train.steps == 2


def test_wandb_sweep_definition_runs_the_same_points(tmp_path, capsys):
  from wandb.sdk.launch.sweeps.utils import create_sweep_command_args  # how the agent formats ${args}

  path = write_config(tmp_path, 'product({"optimizer.learning_rate": [1e-3, 1e-2]}, seeds(2))')
  workdir, out_file = tmp_path / "sweep", tmp_path / "defs" / "sweep.yaml"
  status, out, _ = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--wandb-sweep", str(out_file),
                             "--config.train.steps=2")
  assert status == 0 and out.startswith(f"wrote {out_file}") and not workdir.exists()
  definition = yaml.safe_load(out_file.read_text())
  assert definition["method"] == "grid" and definition["project"] == "finetune"
  assert definition["parameters"] == {"config.optimizer.learning_rate": {"values": [0.001, 0.01]},
                                      "config.seed": {"values": [0, 1]}}
  command = definition["command"]
  assert command[0] == "${env}" and command[-1] == "${args}"
  points = {(p.values["optimizer.learning_rate"], p.values["seed"]): p
            for p in load_sweep(path, ["train.steps=2"])}
  for lr, seed in itertools.product([0.001, 0.01], [0, 1]):
    flags = create_sweep_command_args({"args": {"config.optimizer.learning_rate": {"value": lr},
                                               "config.seed": {"value": seed}}})["args"]
    argv = shlex.split(command[3].split("exec python -m finetune ", 1)[1].replace('"$@"', shlex.join(flags)))
    rest, overrides = cli.split_overrides(argv)
    parsed = cli._parser().parse_args(rest)  # pylint: disable=protected-access
    config = config_lib.load_config(parsed.config, overrides)
    point = points[(lr, seed)]
    expected = config_lib.load_config(point.config_spec, [*point.overrides, "wandb.mode=online"])
    assert config_lib.to_json(config) == config_lib.to_json(expected)
  # As the agent runs it (its ${env}, a run id in the environment), with wandb switched back off for the test.
  env = {**os.environ, "WANDB_RUN_ID": "run7", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
  result = subprocess.run(["/usr/bin/env", *command[1:-1], *flags, "--config.wandb.mode=disabled"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  saved = json.loads((workdir / "wandb" / "run7" / "config.json").read_text())
  assert (saved["optimizer"]["learning_rate"], saved["seed"], saved["train"]["steps"]) == (0.01, 1, 2)

  # Values whose text reads as another literal, and strings inside tuples, reach the config exactly.
  tricky = write_config(tmp_path, 'product({"wandb.name": ["True", "1", "a b", "x"]}, '
                                  '{"wandb.tags": [("1", "True"), ("t",)]})', name="tricky.py")
  status, _, _ = sweep_cli(capsys, "--config", tricky, "--workdir", str(workdir), "--wandb-sweep", str(out_file))
  definition = yaml.safe_load(out_file.read_text())
  parameters = definition["parameters"]
  run, read = definition["command"][3].split("exec python -m finetune ", 1)[1], []
  for name, tags in itertools.product(parameters["config.wandb.name"]["values"],
                                      parameters["config.wandb.tags"]["values"]):
    flags = create_sweep_command_args({"args": {"config.wandb.name": {"value": name},
                                               "config.wandb.tags": {"value": tags}}})["args"]
    rest, overrides = cli.split_overrides(shlex.split(run.replace('"$@"', shlex.join(flags))))
    parsed = cli._parser().parse_args(rest)  # pylint: disable=protected-access
    config = config_lib.load_config(parsed.config, overrides)
    read.append((config.wandb.name, config.wandb.tags))
  assert status == 0 and read == list(itertools.product(["True", "1", "a b", "x"], [("1", "True"), ("t",)]))



def _agent_argv(command: list[str], flags: list[str], tmp_path) -> list[str]:
  """The arguments after `python -m finetune` when wandb's agent runs `command` with `flags`: its `sh -c` script
  runs for real, with a `python` on PATH that prints its arguments."""
  stub = tmp_path / "bin" / "python"
  stub.parent.mkdir(exist_ok=True)
  stub.write_text('#!/bin/sh\nprintf "%s\\0" "$@"\n')
  stub.chmod(0o755)
  env = {**os.environ, "WANDB_RUN_ID": "run7", "PATH": f"{stub.parent}:{os.environ['PATH']}"}
  result = subprocess.run([*command[1:-1], *flags], env=env, capture_output=True, text=True, timeout=60, check=True)
  argv = result.stdout.split("\0")[:-1]
  assert argv[:2] == ["-m", "finetune"]
  return argv[2:]


def test_wandb_sweep_over_config_file_arguments_runs_the_same_points(tmp_path, capsys):
  """`:key` points become `arg.key` parameters, folded back into the `:arg` of `--config` by the run's script."""
  from wandb.sdk.launch.sweeps.utils import create_sweep_command_args  # how the agent formats ${args}

  path = tmp_path / "file_args.py"
  path.write_text(CONFIG.format(extra=", wandb=dict(name=args.tag), optimizer=dict(learning_rate=args.lr)",
                                sweep='product({":tag": ["a,b", "True", "it\'s"]}, {":steps": [2, 4]}, seeds(2))')
                  .replace("parse_arg(arg, steps=3)", "parse_arg(arg, steps=3, tag='x', lr=0.1)"))
  out_file = tmp_path / "sweep.yaml"
  for spec in (f"{path}:lr=0.5", str(path)):  # `,` after kept arguments, `:` when there are none
    status, _, err = sweep_cli(capsys, "--config", spec, "--workdir", str(tmp_path / "w"), "--wandb-sweep",
                               str(out_file))
    assert status == 0, err
    definition = yaml.safe_load(out_file.read_text())
    parameters = definition["parameters"]
    assert list(parameters) == ["arg.tag", "arg.steps", "config.seed"]
    points = {(p.values[":tag"], p.values[":steps"], p.values["seed"]): p for p in load_sweep(spec)}
    for tag, steps, seed in itertools.product(*(parameters[k]["values"] for k in parameters)):
      flags = create_sweep_command_args({"args": {"arg.tag": {"value": tag}, "arg.steps": {"value": steps},
                                                 "config.seed": {"value": seed}}})["args"]
      rest, overrides = cli.split_overrides(_agent_argv(definition["command"], flags, tmp_path))
      parsed = cli._parser().parse_args(rest)  # pylint: disable=protected-access
      assert parsed.workdir == str(tmp_path / "w" / "wandb" / "run7")
      config = config_lib.load_config(parsed.config, overrides)
      point = points[(config.wandb.name, config.train.steps, config.seed)]
      expected = config_lib.load_config(point.config_spec, [*point.overrides, "wandb.mode=online"])
      assert config_lib.to_json(config) == config_lib.to_json(expected)
      assert config.optimizer.learning_rate == (0.5 if ":" in spec else 0.1)
      del points[(config.wandb.name, config.train.steps, config.seed)]
    assert not points  # every point once


def test_a_wandb_sweep_of_points_that_are_no_grid_names_each_point(tmp_path, capsys):
  """A zipped sweep is one wandb parameter, `only`, naming the points; each agent run trains its point in the
  sweep's own folder layout, so --aggregate-only tabulates the agents' runs."""
  from wandb.sdk.launch.sweeps.utils import create_sweep_command_args  # how the agent formats ${args}

  not_a_grid = write_config(tmp_path, 'zipped(seeds(2), [{"train.steps": 2}, {"train.steps": 3}])')
  workdir, out_file = tmp_path / "sweep", tmp_path / "sweep.yaml"
  status, _, err = sweep_cli(capsys, "--config", not_a_grid, "--workdir", str(workdir), "--wandb-sweep",
                             str(out_file), "--config.train.log_every=2")
  assert status == 0, err
  definition = yaml.safe_load(out_file.read_text())
  names = [point.name for point in load_sweep(not_a_grid)]
  assert definition["parameters"] == {"only": {"values": names}}
  flags = create_sweep_command_args({"args": {"only": {"value": names[1]}}})["args"]
  command = definition["command"]
  assert command[:4] == ["${env}", "python", "-m", "finetune"] and command[-1] == "${args}"
  env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
  result = subprocess.run(["/usr/bin/env", *command[1:-1], *flags, "--config.wandb.mode=disabled"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "[1/1 done, 0 failed] finished" in result.stdout
  saved = json.loads((workdir / names[1] / "config.json").read_text())
  assert (saved["seed"], saved["train"]["steps"], saved["train"]["log_every"]) == (1, 3, 2)
  assert not (workdir / names[0]).exists()
  assert [row["status"] for row in read_csv(workdir / "results.csv")] == ["incomplete", "finished"]


def test_only_runs_or_prints_just_the_named_points(tmp_path, capsys):
  path = write_config(tmp_path, "seeds(3)")
  workdir = tmp_path / "sweep"
  names = [point.name for point in load_sweep(path)]
  status, out, _ = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--dry-run", "--only", names[2])
  assert status == 0 and len(out.strip().splitlines()) == 1 and f"--config.seed={2}" in out
  assert not workdir.exists()
  status, out, err = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--only", names[0], "--only",
                               names[2], "--config.train.steps=2")
  assert status == 0, err
  assert "[2/2 done, 0 failed]" in out and f"running {names[1]}" not in out
  assert [row["status"] for row in read_csv(workdir / "results.csv")] == ["finished", "incomplete", "finished"]
  assert [entry["name"] for entry in json.loads((workdir / "points.json").read_text())] == names
  status, out, _ = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--only", names[0],
                             "--config.train.steps=2")
  assert status == 0 and "skipped (finished)" in out
  status, _, err = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--only", "nope")
  assert status == 2 and "--only: no point named 'nope'" in err and names[1] in err
  points = load_sweep(path)
  # (the library call ran nothing and said nothing; a string matched substrings)
  for only, expected in ((["nope"], "no point named 'nope'"), (names[0], "give a list of point names")):
    with pytest.raises(FinetuneError, match=expected):
      sweep.run_sweep(points, str(tmp_path / "library"), only=only)
  assert not (tmp_path / "library").exists()
  for flag in (["--together", names[0]], ["--wandb-sweep", str(tmp_path / "w.yaml")], ["--aggregate-only"]):
    status, _, err = sweep_cli(capsys, "--config", path, "--workdir", str(workdir), "--only", names[1], *flag)
    assert status == 2 and "--only picks points to run or print" in err


def test_counts_print_as_whole_numbers_and_rates_with_four_decimals():
  assert sweep._mean_std_text([770.0, 770.0]) == "770 ± 0"
  assert sweep._mean_std_text([0.5, 0.7]) == "0.6000 ± 0.1414"
  assert sweep._mean_std_text([18874.2]) == "18,874"
  assert sweep._mean_std_text([2.0, 4.0, 6.0]) == "4 ± 2"


def test_mean_and_std_print_with_the_decimals_they_need():
  """Decimals follow the mean and std, not the inputs: whole inputs can have a fractional mean or std."""
  assert sweep._mean_std_text([0.0, 1.0]) == "0.5000 ± 0.7071"
  assert sweep._mean_std_text([2, 3]) == "2.5000 ± 0.7071"
  assert sweep._mean_std_text([1000.0, 1001.0]) == "1,000.50 ± 0.71"  # a throughput's spread below 1
  assert sweep._mean_std_text([18874.2, 18900.7]) == "18,887 ± 19"
  assert sweep._mean_std_text([1e-5, 2e-5]) == "0.0000150 ± 0.0000071"  # not 0.0000 ± 0.0000
  assert sweep._mean_std_text([1e-20, 2e-20]) == "1.5e-20 ± 7.07e-21"


def test_a_cells_count_is_its_own_when_some_runs_lack_the_metric():
  rows = [{"point": f"p{i}", "seed": i, "status": "finished", "a": a, "b": 0.25}
          for i, a in enumerate([0.5, None, 0.7])]
  assert sweep.grouped_table(rows, [], ["a", "b"]).splitlines()[2] == (
      "| 0.6000 ± 0.1414 (n=2) | 0.2500 ± 0.0000 | 3 |")


def test_a_sweep_whose_points_change_from_call_to_call_is_refused(tmp_path):
  """(An unseeded random search: --vmap's children read other points and failed every group, re-runs started new
  folders instead of skipping finished points.)"""
  random_search = ("[{'optimizer.learning_rate': float(__import__('random').uniform(1e-4, 1e-2))} for _ in range(3)]")
  with pytest.raises(FinetuneError, match=r"get_sweep in .*random.py returns other points on each call \(a random "
                                          r"search without a fixed seed\?\): draw them from a seeded generator"):
    load_sweep(write_config(tmp_path, random_search, name="random.py"))
  seeded = ("[{'optimizer.learning_rate': float(v)} for v in "
            "__import__('numpy').random.default_rng(0).uniform(1e-4, 1e-2, 3)]")
  assert len(load_sweep(write_config(tmp_path, seeded, name="seeded.py"))) == 3
