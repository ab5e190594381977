"""metrics.jsonl writing and truncation on resume; wandb offline (never the network); atomic JSON files."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
import types

import pytest

from conftest import tiny_config
from finetune import files, reporting
from finetune import train as train_lib
from finetune.errors import FinetuneError
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


def test_a_netrc_without_a_wandb_entry_is_no_key(tmp_path, monkeypatch, capsys):
  """(Any ~/.netrc counted as a key: wandb.init then failed with 'No API key configured', a traceback.)"""
  from finetune import reporting  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  monkeypatch.delenv("NETRC", raising=False)
  monkeypatch.delenv("WANDB_BASE_URL", raising=False)
  monkeypatch.delenv("WANDB_CONFIG_DIR", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  (tmp_path / ".netrc").write_text("machine github.com login me password x\n")
  assert not reporting._has_api_key()  # pylint: disable=protected-access
  (tmp_path / ".netrc").write_text("machine github.com login me password x\nmachine api.wandb.ai login user "
                                   "password " + "k" * 40 + "\n")
  assert reporting._has_api_key()  # pylint: disable=protected-access
  # A self-hosted server: its host with the port (as `wandb login --host` writes it), named by WANDB_BASE_URL or by
  # the base_url that login saved in wandb's settings file.
  (tmp_path / ".netrc").write_text("machine localhost:8080 login user password " + "k" * 40 + "\n")
  assert not reporting._has_api_key()  # pylint: disable=protected-access
  monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
  (tmp_path / "wandb_config").mkdir()
  (tmp_path / "wandb_config" / "settings").write_text("[default]\nbase_url = http://localhost:8080\n")
  assert reporting._has_api_key()  # pylint: disable=protected-access


def _fake_wandb_run(calls):
  run = types.SimpleNamespace(logged=[], finish=lambda: None)
  run.log = lambda values, step=None: run.logged.append((step, values))
  return run


def test_an_online_start_that_fails_logs_offline(tmp_path, monkeypatch, capsys):
  """(A key with no connection hung for wandb's 90 s, then a CommError traceback, exit 1, nothing trained.)"""
  import wandb  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
  calls = []

  def init(**kwargs):
    calls.append(kwargs)
    if kwargs["mode"] == "online":
      raise wandb.errors.CommError("Timed out while retrying: no such host\nmore detail")
    return _fake_wandb_run(calls)

  monkeypatch.setattr(wandb, "init", init)
  log = MetricsLog(str(tmp_path), tiny_config(wandb={"mode": "online"}).wandb, "train")
  assert [c["mode"] for c in calls] == ["online", "offline"] and calls[0]["id"] == calls[1]["id"]
  assert "could not start online (Timed out while retrying: no such host); logging offline" in capsys.readouterr().err
  # NaN and inf reach wandb as numbers (its charts show them), not as the text metrics.jsonl holds.
  log.write(3, "train", {"loss": float("nan"), "grad_norm": float("inf"), "accuracy": 0.5})
  step, values = log._wandb.logged[0]  # pylint: disable=protected-access
  assert step == 3 and values["train/accuracy"] == 0.5 and all(isinstance(values[k], float) for k in values)
  assert values["train/loss"] != values["train/loss"] and values["train/grad_norm"] == float("inf")


def test_a_resumed_stage_logs_into_its_wandb_run(tmp_path, monkeypatch):
  """(A restart opened a second wandb run of the same name, holding only the steps after the checkpoint.)"""
  monkeypatch.setenv("HOME", str(tmp_path))
  config = tiny_config(wandb={"mode": "offline", "project": "test"},
                       train={"steps": 6, "log_every": 2, "checkpoint_every": 3})
  run = tmp_path / "run"
  train_lib.train_and_evaluate(config, str(run))
  for name in ("summary.json", "results.json"):  # interrupted after step 3's checkpoint
    os.remove(run / name)
  shutil.rmtree(run / "checkpoints" / "6")
  train_lib.train_and_evaluate(config, str(run))
  run_id = (run / "wandb_run_id").read_text().strip()
  attempts = glob.glob(str(run / "wandb" / "offline-run-*"))
  # (wandb names a run's folder by the second it starts; two attempts within one second get a "-1" suffix)
  assert len(attempts) == 2 and all(re.search(rf"-{run_id}(-\d+)?$", path) for path in attempts), attempts
  # A fresh start in the folder (no checkpoint to resume: here all removed) is a wandb run of its own.
  for name in ("summary.json", "results.json"):
    os.remove(run / name)
  shutil.rmtree(run / "checkpoints")
  train_lib.train_and_evaluate(config, str(run))
  fresh_id = (run / "wandb_run_id").read_text().strip()
  assert fresh_id != run_id and len(glob.glob(str(run / "wandb" / f"offline-run-*-{fresh_id}"))) == 1


def test_wandb_runs_are_named_after_their_workdir_and_stage(tmp_path, monkeypatch):
  import wandb  # pylint: disable=g-import-not-at-top
  names = []
  monkeypatch.setattr(wandb, "init", lambda **kwargs: names.append(kwargs["name"]) or _fake_wandb_run([]))
  stages = {"pre": {"data": {"classes": (0, 1, 2, 3, 4)}},
            "ft": {"data": {"classes": (5, 6, 7, 8, 9)}, "init_from": "stage:pre", "dont_load": ("^head/",)}}
  train_lib.train_and_evaluate(tiny_config(wandb={"mode": "offline"}, train={"steps": 2}, stages=stages),
                               str(tmp_path / "lr=0.1,seed=0"))
  train_lib.train_and_evaluate(tiny_config(wandb={"mode": "offline"}, train={"steps": 2}), str(tmp_path / "alone"))
  assert names == ["lr=0.1,seed=0/pre", "lr=0.1,seed=0/ft", "alone"]


def test_wandb_missing_is_refused_before_anything_is_written(tmp_path, monkeypatch):
  """(A ModuleNotFoundError traceback after the data and model were built and the run folder written.)"""
  monkeypatch.setitem(__import__("sys").modules, "wandb", None)
  with pytest.raises(FinetuneError, match=r"config.wandb.mode logs to wandb, which is not installed: `pip install "
                                          r"wandb`, or set config.wandb.mode=disabled"):
    train_lib.train_and_evaluate(tiny_config(wandb={"mode": "offline"}), str(tmp_path / "run"))
  assert os.listdir(tmp_path / "run") == [".lock"]  # (the workdir's lock: nothing of the run)


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


def test_an_export_with_files_added_since_is_not_replaced(tmp_path):
  """(Replacing an earlier export deleted what the user had added to it: a model card, a git checkout for the
  Hub.)"""
  from finetune.reporting import EXPORT_MARKER  # pylint: disable=g-import-not-at-top
  out = tmp_path / "export"
  for _ in range(2):  # an export replaces its own files, nested ones included
    with staged_directory(str(out)) as staging:
      os.makedirs(os.path.join(staging, "base_model"))
      open(os.path.join(staging, "base_model", "model.txt"), "w").write("1")
  (out / "README.md").write_text("model card")
  (out / ".git").mkdir()
  (out / ".git" / "HEAD").write_text("ref")
  with pytest.raises(FinetuneError, match=r"is an earlier export with files it did not write \(.git/HEAD, README.md\)"
                                          r", which replacing it would delete: move them out"):
    with staged_directory(str(out)) as staging:
      open(os.path.join(staging, "model.txt"), "w").write("2")
  assert (out / "README.md").exists() and sorted(os.listdir(tmp_path)) == ["export"]
  (out / EXPORT_MARKER).write_text("")  # an export from before the marker listed its files: replaced as before
  with staged_directory(str(out)) as staging:
    open(os.path.join(staging, "model.txt"), "w").write("3")
  assert sorted(os.listdir(out)) == [EXPORT_MARKER, "model.txt"]


def test_an_export_through_a_symbolic_link_replaces_the_folder_it_points_to(tmp_path):
  """(The rename onto the link failed with 'Is a directory', leaving an empty '-old-' folder on every try.)"""
  (tmp_path / "disk" / "model").mkdir(parents=True)
  (tmp_path / "link").symlink_to(tmp_path / "disk" / "model")
  for version in ("1", "2"):
    with staged_directory(str(tmp_path / "link")) as staging:
      open(os.path.join(staging, "model.txt"), "w").write(version)
  assert (tmp_path / "link").is_symlink() and (tmp_path / "link" / "model.txt").read_text() == "2"
  assert sorted(os.listdir(tmp_path)) == ["disk", "link"] and os.listdir(tmp_path / "disk") == ["model"]


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


def test_experiment_plot_is_found_from_a_subfolder_and_named_after_its_experiment(tmp_path):
  """Notebooks load experiments/<name>/plot.py wherever in the checkout they run; each script gets its own module
  name, so two experiments' scripts in one kernel do not shadow each other."""
  for name in ("alpha", "beta"):
    (tmp_path / "experiments" / name).mkdir(parents=True)
    # (A dataclass under postponed annotations looks its module up by name: it must be registered.)
    (tmp_path / "experiments" / name / "plot.py").write_text(
        "from __future__ import annotations\nimport dataclasses\n\n\n@dataclasses.dataclass\nclass Row:\n"
        f"  value: float\n\n\nNAME = {name!r}\n")
  (tmp_path / "notebooks").mkdir()
  alpha = reporting.experiment_plot("alpha", start=str(tmp_path / "notebooks"))
  beta = reporting.experiment_plot("beta", start=str(tmp_path))
  assert (alpha.NAME, alpha.__name__, beta.NAME, beta.__name__) == ("alpha", "alpha_plot", "beta", "beta_plot")
  assert alpha.__file__ == str(tmp_path / "experiments" / "alpha" / "plot.py")
  with pytest.raises(FinetuneError, match=r"no experiments/gamma/plot.py in .*notebooks or any folder above it"):
    reporting.experiment_plot("gamma", start=str(tmp_path / "notebooks"))
  (tmp_path / "experiments" / "alpha" / "plot.py").write_text("raise ValueError('a bad edit')\n")
  with pytest.raises(ValueError, match="a bad edit"):
    reporting.experiment_plot("alpha", start=str(tmp_path))
  assert sys.modules["alpha_plot"] is alpha  # the module loaded before stays
