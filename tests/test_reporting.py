"""metrics.jsonl writing and truncation on resume; wandb offline (never the network); atomic JSON files."""

from __future__ import annotations

import glob
import json
import os
import types

import pytest

from conftest import tiny_config
from finetune import files
from finetune import train as train_lib
from finetune.reporting import MetricsLog, staged_directory, write_json


def test_metrics_log_appends_and_truncates(tmp_path):
  log = MetricsLog(str(tmp_path))
  for step in (1, 2, 3):
    log.write(step, "train", {"loss": float(step), "accuracy": 0.5})
  log.write(3, "validation", {"loss": float("nan"), "accuracy": 0.1})
  log.truncate_after(2)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r["split"], r["loss"]) for r in records] == [(1, "train", 1.0), (2, "train", 2.0)]


def test_non_finite_values_are_written_as_text(tmp_path):
  MetricsLog(str(tmp_path)).write(1, "train", {"loss": float("inf")})
  assert json.loads(open(tmp_path / "metrics.jsonl").read())["loss"] == "inf"


def test_write_json_leaves_no_temporary_file(tmp_path):
  write_json(str(tmp_path / "a.json"), {"x": 1})
  assert os.listdir(tmp_path) == ["a.json"] and json.load(open(tmp_path / "a.json")) == {"x": 1}


def test_wandb_online_without_key_logs_offline(tmp_path, monkeypatch, capsys):
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with credentials
  config = tiny_config(wandb={"mode": "online", "project": "test"}, train={"steps": 4, "log_every": 2})
  train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  assert "logging offline" in capsys.readouterr().err
  runs = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "*.wandb"))
  assert len(runs) == 1 and os.path.getsize(runs[0]) > 0


def test_under_a_wandb_agent_every_stage_logs_into_the_agent_s_one_run(tmp_path, monkeypatch):
  """(Each stage called wandb.init, and under an agent each took the agent's run id: two runs of one id, the later
  replacing the earlier on the server.)"""
  import wandb  # pylint: disable=g-import-not-at-top
  from finetune import reporting  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("WANDB_SWEEP_ID", "sweep1")
  monkeypatch.setenv("WANDB_RUN_ID", "agentrun7")
  monkeypatch.setenv("HOME", str(tmp_path))  # no credentials: offline
  stages = {"pre": {"data": {"classes": (0, 1, 2, 3, 4)}},
            "ft": {"data": {"classes": (5, 6, 7, 8, 9)}, "init_from": "stage:pre", "dont_load": ("^head/",)}}
  config = tiny_config(wandb={"mode": "offline", "project": "test"}, train={"steps": 4, "log_every": 2},
                       stages=stages)
  try:
    train_lib.train_and_evaluate(config, str(tmp_path / "real"))
  finally:
    reporting._AGENT_RUNS.pop("agentrun7").finish()  # pylint: disable=protected-access
  runs = glob.glob(str(tmp_path / "real" / "**" / "offline-run-*"), recursive=True)
  assert len(runs) == 1 and runs[0].endswith("-agentrun7")

  class FakeRun:  # what the stages send to wandb
    def __init__(self):
      self.logged, self.metrics, self.configs, self.finished = [], [], [], 0
      self.config = types.SimpleNamespace(update=lambda values, **_: self.configs.append(values))

    def define_metric(self, name, step_metric=None):
      self.metrics.append((name, step_metric))

    def log(self, values, step=None):
      assert step is None
      self.logged.append(values)

    def finish(self):
      self.finished += 1

  started = []
  monkeypatch.setattr(wandb, "init", lambda **kwargs: started.append(FakeRun()) or started[-1])
  train_lib.train_and_evaluate(config, str(tmp_path / "fake"))
  run = reporting._AGENT_RUNS.pop("agentrun7")  # pylint: disable=protected-access
  assert started == [run] and run.finished == 0
  assert [list(c) for c in run.configs] == [["pre"], ["ft"]] and run.configs[1]["ft"]["init_from"] == "stage:pre"
  assert ("pre/*", "pre/step") in run.metrics and ("ft/*", "ft/step") in run.metrics
  steps = {stage: [v[f"{stage}/step"] for v in run.logged if f"{stage}/train/loss" in v] for stage in ("pre", "ft")}
  assert steps == {"pre": [2, 4], "ft": [2, 4]}
  assert all(len({key.split("/")[0] for key in values}) == 1 for values in run.logged)  # one stage per record


def test_an_export_replaces_the_previous_one_only_once_it_is_complete(tmp_path, monkeypatch):
  out = tmp_path / "export"
  for version in ("1", "2"):
    with staged_directory(str(out)) as staging:
      open(os.path.join(staging, "model.txt"), "w").write(version)
  assert (out / "model.txt").read_text() == "2" and os.listdir(tmp_path) == ["export"]
  # The move of the new export into place fails: the previous one is back where it was, nothing else is left.
  real_replace = os.replace

  def failing(source, destination):
    if os.path.basename(source).startswith(".export-") and "-old-" not in source:
      raise OSError("disk full")
    return real_replace(source, destination)

  monkeypatch.setattr(os, "replace", failing)
  with pytest.raises(OSError, match="disk full"):
    with staged_directory(str(out)) as staging:
      open(os.path.join(staging, "model.txt"), "w").write("3")
  assert (out / "model.txt").read_text() == "2" and os.listdir(tmp_path) == ["export"]


def test_exports_and_atomic_files_are_readable_by_others(tmp_path):
  """(mkdtemp's staging folder and safetensors' writer left exports and adapter files 0700/0600.)"""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  with staged_directory(str(tmp_path / "export")) as staging:
    save_file({"w": np.zeros(2)}, os.path.join(staging, "model.safetensors"))
  with files.atomic_path(str(tmp_path / "adapter.safetensors")) as tmp:
    save_file({"w": np.zeros(2)}, tmp)
  mask = os.umask(0)
  os.umask(mask)
  assert os.stat(tmp_path / "export").st_mode & 0o777 == 0o777 & ~mask
  for path in (tmp_path / "export" / "model.safetensors", tmp_path / "adapter.safetensors"):
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask, path


def test_a_failed_atomic_write_names_the_path_asked_for(tmp_path):
  """(The error named the temp file, `.x.json-v1lln5b2`, or nothing at all for a full disk's write.)"""
  import errno  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  with pytest.raises(FileNotFoundError) as info:
    files.write_text(str(tmp_path / "no" / "x.json"), "{}")
  assert info.value.filename == str(tmp_path / "no" / "x.json")
  with pytest.raises(OSError) as info:
    with files.atomic_path(str(tmp_path / "y.json")):
      raise OSError(errno.ENOSPC, "No space left on device")
  assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(tmp_path / "y.json"))
  with pytest.raises(io.UnsupportedOperation):  # no errno: raised as it was, message and type kept
    with files.atomic_path(str(tmp_path / "z.json")):
      raise io.UnsupportedOperation("not writable")
  assert os.listdir(tmp_path) == []  # no temp file left behind
