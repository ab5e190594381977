"""The command line: `finetune train` runs a config; every user error is one line on stderr, exit status 2."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from finetune import cli
from finetune.checkpoint import resolve_checkpoint
from finetune.errors import FinetuneError
from finetune.export import latest_checkpoint

TINY = '''
def get_config(arg=None):
  return dict(model=dict(name="mlp", input_size=64, hidden=(16,)),
              data=dict(name="digits", batch_size=32, eval_batch_size=64, eval_splits=("validation",)),
              train=dict(steps=3, log_every=1, checkpoint_every=0))
'''


@pytest.fixture
def tiny_file(tmp_path):
  path = tmp_path / "tiny.py"
  path.write_text(TINY)
  return str(path)


def test_plan_devices_wins_over_jax_num_cpu_devices(tiny_file):
  """(os.environ.update kept JAX_NUM_CPU_DEVICES, which jax prefers to the flag: a fresh process reported that jax
  already saw 2 devices and told the user to use a fresh process.)"""
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2"}
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-m", "finetune", "plan", "--config", tiny_file, "--devices", "4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("4 cpu device(s)")


@pytest.mark.parametrize("flags, message", [
    # (The mesh error suggested --config.mesh.fsdp=1, which --mesh, applied last, then replaced silently.)
    (["--mesh", "data=2,fsdp=1"], r"--mesh data=2,fsdp=1: config.mesh \{.*\} needs 2 devices but 4 are available; "
                                  r"change --mesh or --devices$"),
    (["--mesh", "data=2,fsdp=2", "--config.mesh.fsdp=1"], r"--mesh and --config.mesh.fsdp both set mesh.fsdp"),
], ids=["mesh-too-small", "mesh-set-twice"])
def test_plan_mesh_errors_name_the_flag_that_sets_it(tiny_file, flags, message):
  result = subprocess.run([sys.executable, "-m", "finetune", "plan", "--config", tiny_file, "--devices", "4", *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and re.search(message, result.stderr.strip().splitlines()[-1]), result.stderr


def test_python_dash_m_runs_a_config_and_prints_the_table(tiny_file, tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run([sys.executable, "-m", "finetune", "train", "--config", tiny_file, "--workdir",
                           str(workdir), "--config.train.steps", "4"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines[0] == "[train] 1,210 of 1,210 parameters train at step 0; layer groups:"
  table = lines.index(next(l for l in lines if l.startswith("stage ")))
  assert lines[table].split()[:4] == ["stage", "dataset", "split", "accuracy"]
  assert lines[table + 2].startswith("train") and "validation" in lines[table + 2]
  assert result.stderr == ""
  assert lines[-1] == f"outputs: {workdir}"
  assert '"steps": 4' in (workdir / "config.json").read_text()


def test_the_cli_loads_jax_only_after_its_interrupt_handling_is_installed():
  """(The package imported finetune.train, and with it jax, before `cli.main` ran: a Ctrl-C in the first seconds
  was a traceback, or was swallowed and the run trained to the end.)"""
  code = "import sys, finetune.cli; print('jax' in sys.modules, 'finetune.train' in sys.modules)"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert result.stdout.split() == ["False", "False"]
  import finetune  # pylint: disable=g-import-not-at-top
  from finetune import train as train_lib  # pylint: disable=g-import-not-at-top
  assert finetune.train_and_evaluate is train_lib.train_and_evaluate


def test_user_error_is_one_line_without_traceback(tiny_file, tmp_path):
  result = subprocess.run([sys.executable, "-m", "finetune", "train", "--config", tiny_file, "--workdir",
                           str(tmp_path / "w"), "--config.model.name=resnet"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "finetune: error: unknown model 'resnet'; valid model names: bert, cnn, gpt2, llama, lstm, mlp, vit"]


def _error(capsys, argv) -> str:
  assert cli.main(argv) == 2
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("finetune: error: "), captured.err
  return lines[0][len("finetune: error: "):]


def test_bad_inputs_each_give_one_line(capsys, tiny_file, tmp_path):
  workdir = str(tmp_path / "w")
  cases = {
      ("--config.train.stepz=3",): "unknown config key 'train.stepz' (did you mean 'train.steps'?)",
      ("--config.data.name=mnsit",): "unknown data source 'mnsit' (did you mean 'mnist'?)",
      ("--config.optimizer.name=adam",): "valid optimizer names: adamw, sgd",
      ("--config.data.name=mnist", "--config.data.path=/no/such/dir"): "MNIST folder '/no/such/dir' does not exist",
      ("--config.init_from=/no/such/run",): "init_from '/no/such/run' does not exist",
      ("--config.train.steps=-1",): "set config.train.steps or config.train.epochs to a positive number",
      ("--config.train.steps",): "override --config.train.steps has no value",
      ("--config.peft.method=lorra",): "unknown peft method 'lorra' (did you mean 'lora'?)",
      ("--config.peft.method=lora", "--config.peft.targets=('qkv',)"):
          "config.peft.targets: 'qkv' matches no Linear layer of this model; its layers are named like head, "
          "layers/0",
      ("--config.peft.method=lora", "--config.peft.targets=('layers/0',)", "--config.peft.rank=32"):
          "config.peft.rank=32 for layers/0 of shape (64, 16): the rank must be between 1 and 16",
      ("--config.peft.method=lora", "--config.peft.targets=('layers/0',)", "--config.peft.load_adapter=/no/such"):
          "/no/such is neither an adapter folder",
  }
  for extra, expected in cases.items():
    message = _error(capsys, ["train", "--config", tiny_file, "--workdir", workdir, *extra])
    assert expected in message, (extra, message)
  assert "ignored its argument ':steps=3'" in _error(
      capsys, ["train", "--config", tiny_file + ":steps=3", "--workdir", workdir])  # get_config never parses it
  assert "does not exist" in _error(capsys, ["train", "--config", "configs/nope.py", "--workdir", workdir])
  assert "required: --workdir" in _error(capsys, ["train", "--config", tiny_file])
  # (The next flag was taken as the value: wandb.name became '--config.train.steps=7' and the run trained 300 steps.)
  assert "override --config.wandb.name has no value; write --config.wandb.name=VALUE" in _error(
      capsys, ["train", "--config", tiny_file, "--config.wandb.name", "--config.train.steps=7", "--workdir", workdir])
  assert "invalid choice" in _error(capsys, ["trian"])
  # (An empty --workdir trained into the current folder; a flag given twice kept its last value; extra arguments
  # sent the user to the top-level help.)
  assert "argument --workdir: is empty; give a path" in _error(capsys, ["train", "--config", tiny_file, "--workdir",
                                                                      ""])
  assert "--config is given twice; give it once" in _error(
      capsys, ["train", "--config", tiny_file, "--config", tiny_file, "--workdir", workdir])
  assert "--metric test/accuracy is given twice" in _error(
      capsys, ["sweep", "--config", tiny_file, "--workdir", workdir, "--metric=test/accuracy", "--metric",
               "test/accuracy"])
  assert "unrecognized arguments: extra (see `finetune train --help`)" in _error(
      capsys, ["train", "--config", tiny_file, "--workdir", workdir, "extra"])
  with pytest.raises(SystemExit) as version:  # (it answered "the following arguments are required: command")
    cli.main(["--version"])
  assert version.value.code == 0 and capsys.readouterr().out.startswith("finetune ")
  assert "unrecognized arguments: --conf" in _error(  # (an abbreviation slipped past the check on twice-given flags)
      capsys, ["train", "--config", tiny_file, "--conf", tiny_file, "--workdir", workdir])
  # The framework's own warnings are one line; others (here a file in a folder that is merely named finetune) keep
  # Python's format, which says where they come from.
  own = os.path.join(os.path.dirname(cli.__file__), "train.py")
  assert cli._one_line_warning("slow", UserWarning, own, 3) == "finetune: warning: slow\n"
  assert "UserWarning: slow" in cli._one_line_warning("slow", UserWarning, "/home/u/finetune/configs/x.py", 3)
  from finetune import train as train_lib  # pylint: disable=g-import-not-at-top
  from finetune.config import load_config  # pylint: disable=g-import-not-at-top
  from finetune.errors import FinetuneError  # pylint: disable=g-import-not-at-top
  with pytest.raises(FinetuneError, match="the workdir is empty"):
    train_lib.train_and_evaluate(load_config(tiny_file), "")


def test_broken_config_files_and_paths_are_one_line(capsys, tiny_file, tmp_path):
  broken = {"raises.py": "def get_config(arg=None):\n  raise ValueError('boom')\n",
            "returns_int.py": "def get_config(arg=None):\n  return 42\n",
            "bad_import.py": "import os\nSTEPS = undefined_name\n", "bad_syntax.py": "def get_config(:\n"}
  for name, text in broken.items():
    (tmp_path / name).write_text(text)
  a_file = tmp_path / "a_file.txt"
  a_file.write_text("not a folder")
  workdir = str(tmp_path / "w")
  assert _error(capsys, ["train", "--config", str(tmp_path / "raises.py"), "--workdir", workdir]) == (
      f"config file {tmp_path / 'raises.py'}: get_config raised ValueError: boom "
      f"(at {tmp_path / 'raises.py'}:2 in get_config)")  # (where: the CLI prints no traceback)
  assert _error(capsys, ["train", "--config", str(tmp_path / "bad_import.py"), "--workdir", workdir]).endswith(
      f"failed to import: NameError: name 'undefined_name' is not defined (at {tmp_path / 'bad_import.py'}:2 in "
      "<module>)")
  assert _error(capsys, ["train", "--config", str(tmp_path / "bad_syntax.py"), "--workdir", workdir]).endswith(
      "failed to import: SyntaxError: invalid syntax (bad_syntax.py, line 1)")
  assert "get_config returned int; return an ml_collections.ConfigDict" in _error(
      capsys, ["train", "--config", str(tmp_path / "returns_int.py"), "--workdir", workdir])
  assert "is not a Python file" in _error(capsys, ["train", "--config", str(a_file), "--workdir", workdir])
  for bad_workdir in (a_file, a_file / "run"):  # a file where the run folder (or its parent) should be
    assert str(a_file) in _error(capsys, ["train", "--config", tiny_file, "--workdir", str(bad_workdir)])
  for devices in ("-2", "0"):
    assert f"--devices {devices}: give a number of devices >= 1" in _error(
        capsys, ["plan", "--config", tiny_file, "--devices", devices])
  assert _error(capsys, ["plan", "--config", tiny_file, "--mesh", "fsdp=2"]).endswith(  # (1 device here)
      "does not divide 1 devices; change --mesh; to plan for N accelerators on this machine, add --devices N")
  for mesh in ("data=--2", "data=two", "data"):
    assert "write axis=size pairs such as data=4,fsdp=2" in _error(
        capsys, ["plan", "--config", tiny_file, "--mesh", mesh])
  for override, expected in [("optimizer.learning_rate=1e400", "must be a finite number, got inf"),
                             ("optimizer.learning_rate=nan", "must be a finite number, got 'nan'"),
                             ("optimizer.weight_decay=-1.0", "weight_decay must be >= 0"),
                             ("train.label_smoothing=-0.1", "label_smoothing must be in [0, 1)")]:
    assert expected in _error(capsys, ["train", "--config", tiny_file, "--workdir", workdir, f"--config.{override}"])


VIT = TINY.replace('model=dict(name="mlp", input_size=64, hidden=(16,))',
                   'model=dict(name="vit", image_size=8, patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32)')


def test_an_unfinished_export_names_the_classes_the_run_trains_on(tmp_path):
  """(Without summary.json the export named them by index: a run on digits 5..9 labelled a 5 as '0'.)"""
  (tmp_path / "vit.py").write_text(VIT)
  run, out = tmp_path / "run", tmp_path / "exported"
  assert cli.main(["train", "--config", str(tmp_path / "vit.py"), "--workdir", str(run),
                   "--config.data.classes=(5, 6, 7)", "--config.train.checkpoint_every=3"]) == 0
  os.remove(run / "summary.json")  # as if it had been stopped before its end
  assert cli.main(["export", "--workdir", str(run), "--out", str(out), "--unfinished"]) == 0
  assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "5", "1": "6", "2": "7"}


def test_eval_and_export_take_an_intermediate_checkpoint_by_step(capsys, tmp_path):
  """(Only the final checkpoint could be read; a step folder given as --workdir was 'not a run directory'.)"""
  from finetune.checkpoint import read_checkpoint_arrays  # pylint: disable=g-import-not-at-top
  from finetune.models import hf  # pylint: disable=g-import-not-at-top
  (tmp_path / "vit.py").write_text(VIT)
  run = tmp_path / "run"
  assert cli.main(["train", "--config", str(tmp_path / "vit.py"), "--workdir", str(run),
                   "--config.train.steps=6", "--config.train.checkpoint_every=3"]) == 0
  steps = sorted(int(n) for n in os.listdir(run / "checkpoints") if n.isdigit())
  assert len(steps) > 1
  capsys.readouterr()
  assert cli.main(["eval", "--workdir", str(run), "--step", str(steps[0]), "--out", str(tmp_path / "e.json")]) == 0
  early = json.loads((tmp_path / "e.json").read_text())
  final = json.loads((run / "summary.json").read_text())["final"]
  assert set(early) == set(final) and early["validation"]["loss"] != final["validation"]["loss"]
  assert cli.main(["export", "--workdir", str(run), "--step", str(steps[0]), "--out", str(tmp_path / "hf")]) == 0
  exported = hf.read_params(str(tmp_path / "hf"))["params"]
  kept = read_checkpoint_arrays(str(run / "checkpoints" / str(steps[0])))["params"]
  np.testing.assert_array_equal(exported["head/kernel"], kept["head/kernel"])
  assert f"--step 999: {run} has no checkpoint of that step; it keeps {', '.join(map(str, steps))}" in _error(
      capsys, ["eval", "--workdir", str(run), "--step", "999"])
  assert f"pass the run's folder and the step, --workdir {run} --step {steps[0]}" in _error(
      capsys, ["eval", "--workdir", str(run / "checkpoints" / str(steps[0]))])
  assert "argument --unfinished: not allowed with argument --step" in _error(
      capsys, ["export", "--workdir", str(run), "--out", str(tmp_path / "x"), "--step", "3", "--unfinished"])
  assert "a checkpoint step is a whole number >= 0, not '-3'" in _error(capsys, ["eval", "--workdir", str(run),
                                                                                  "--step", "-3"])


def test_export_replaces_only_an_earlier_export_and_only_finished_runs(capsys, tmp_path):
  (tmp_path / "vit.py").write_text(VIT)
  run = tmp_path / "run"
  assert cli.main(["train", "--config", str(tmp_path / "vit.py"), "--workdir", str(run)]) == 0
  before = sorted(os.listdir(run))
  for out in (run, tmp_path):  # --out the run itself, or a folder holding it
    assert "holds the run being exported" in _error(capsys, ["export", "--workdir", str(run), "--out", str(out)])
  notes = tmp_path / "notes"
  notes.mkdir()
  (notes / "keep.txt").write_text("mine")
  assert "non-empty folder that no earlier export wrote" in _error(
      capsys, ["export", "--workdir", str(run), "--out", str(notes)])
  (tmp_path / "a_file").write_text("x")
  assert "is a file" in _error(capsys, ["export", "--workdir", str(run), "--out", str(tmp_path / "a_file")])
  assert (notes / "keep.txt").read_text() == "mine" and sorted(os.listdir(run)) == before
  out = tmp_path / "exported"
  for stage in ([], ["--stage", "train"]):  # the second export replaces the first; 'train' is the one stage
    assert cli.main(["export", "--workdir", str(run), "--out", str(out), *stage]) == 0
  assert (out / "model.safetensors").is_file()
  assert "holds a single-stage run, whose one stage is 'train'" in _error(
      capsys, ["export", "--workdir", str(run), "--out", str(out), "--stage", "finetune"])
  os.remove(run / "summary.json")  # as if it had been stopped before its end
  assert "has not finished (no summary.json)" in _error(capsys, ["export", "--workdir", str(run), "--out", str(out)])
  assert cli.main(["export", "--workdir", str(run), "--out", str(out), "--unfinished"]) == 0
  assert "is not a PEFT run (config.peft.method is empty); use --format hf" in _error(
      capsys, ["export", "--workdir", str(run), "--out", str(out), "--unfinished", "--format", "peft"])
  for step in [name for name in os.listdir(run / "checkpoints") if name.isdigit()]:
    shutil.rmtree(run / "checkpoints" / step)  # as if killed before its first checkpoint
  # (It blamed init_from, a key the user never set.)
  assert f"{run} has no checkpoint yet (checkpoints/<step>); train it further, or export another --stage" in _error(
      capsys, ["export", "--workdir", str(run), "--out", str(out), "--unfinished"])
  stages = tmp_path / "stages"
  stages.mkdir()
  (stages / "config.json").write_text('{"stages": {"pretrain": {}, "finetune": {}}}')
  assert "stage 'finetune' of" in _error(capsys, ["export", "--workdir", str(stages), "--out", str(out)])
  assert "its stages: pretrain, finetune" in _error(
      capsys, ["export", "--workdir", str(stages), "--stage", "nosuch", "--out", str(out)])
  # (A stage the config declares but that has not run was called no such stage, in a list that named it.)
  for command in (["export", "--out", str(out)], ["eval"]):
    assert "stage 'pretrain' of" in _error(capsys, [*command, "--workdir", str(stages), "--stage", "pretrain"])


def test_a_failed_checkpoint_or_export_write_is_one_line_and_the_run_resumes(capsys, tiny_file, tmp_path,
                                                                            monkeypatch):
  """(A full disk while orbax wrote a checkpoint surfaced as a ValueError at the next save or wait, after some 470
  lines of logged tracebacks, exit 1; safetensors' SafetensorError in an export likewise.) Here orbax's background
  write fails the way a full disk makes it; the real thing was checked on a 1.5 MB tmpfs."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from finetune import files  # pylint: disable=g-import-not-at-top
  from finetune.errors import FinetuneError  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  finish = ocp.CheckpointManager.wait_until_finished

  def full_disk(self):
    finish(self)
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.head.kernel/0" in OCDBT database: No space left')

  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", full_disk)
  message = _error(capsys, ["train", "--config", tiny_file, "--workdir", str(run)])
  assert message.startswith(f"writing checkpoints under {run / 'checkpoints'} failed: ValueError: RESOURCE_EXHAUSTED")
  assert message.endswith("those written before are intact: free space (or fix the folder's permissions) and run "
                          "the same command again to resume")
  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", finish)
  assert cli.main(["train", "--config", tiny_file, "--workdir", str(run)]) == 0
  # Not every error while saving is a full disk: a programming error stays itself.
  def bug(self, *args, **kwargs):
    raise RuntimeError("Array has been deleted with shape=float32[3].")

  monkeypatch.setattr(ocp.CheckpointManager, "save", bug)
  with pytest.raises(RuntimeError, match="Array has been deleted"):
    cli.main(["train", "--config", tiny_file, "--workdir", str(tmp_path / "other")])
  with pytest.raises(FinetuneError, match=r"writing .*missing/x.safetensors failed \(.*\); free space"):
    files.save_safetensors({"a": np.zeros(3, np.float32)}, str(tmp_path / "missing" / "x.safetensors"))


def test_a_failed_safetensors_write_names_the_users_path_not_a_temp_one(monkeypatch, tmp_path):
  """(A full disk while writing an adapter, a Fisher or an export named `.x.safetensors-k3j2` or the export's
  staging folder.)"""
  import safetensors  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from finetune import files, reporting  # pylint: disable=g-import-not-at-top
  from finetune.errors import FinetuneError  # pylint: disable=g-import-not-at-top

  def full_disk(tensors, filename, metadata=None):
    raise safetensors.SafetensorError(f"Error while serializing: IoError(No space left on device) ({filename})")

  monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
  final = str(tmp_path / "x.safetensors")
  with pytest.raises(FinetuneError) as error:
    with files.atomic_path(final) as tmp:
      files.save_safetensors({"a": np.zeros(3, np.float32)}, tmp)
  assert str(error.value).startswith(f"writing {final} failed (") and "x.safetensors-" not in str(error.value)
  out = str(tmp_path / "export")
  with pytest.raises(FinetuneError) as error:
    with reporting.staged_directory(out) as staging:
      files.save_safetensors({"a": np.zeros(3, np.float32)}, os.path.join(staging, "model.safetensors"))
  assert str(error.value).startswith(f"writing {out}/model.safetensors failed (")
  assert sorted(os.listdir(tmp_path)) == []  # no temp file or staging folder left behind


def test_unreadable_checkpoint_is_one_line(capsys, tiny_file, tmp_path):
  broken = tmp_path / "broken" / "checkpoints" / "5" / "state"
  broken.mkdir(parents=True)
  (broken / "garbage").write_text("not a checkpoint")
  (tmp_path / "broken" / "summary.json").write_text(json.dumps({"steps": 5}))  # a finished run's folder
  message = _error(capsys, ["train", "--config", tiny_file, "--workdir", str(tmp_path / "w"),
                            f"--config.init_from={tmp_path / 'broken'}"])
  assert message.startswith(f"cannot read checkpoint {tmp_path / 'broken' / 'checkpoints' / '5'}")


def test_damaged_checkpoints_are_named_in_one_short_line(capsys, tiny_file, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  from finetune.checkpoint import Checkpointer, read_checkpoint_arrays  # pylint: disable=g-import-not-at-top
  from finetune.errors import FinetuneError  # pylint: disable=g-import-not-at-top
  assert cli.main(["train", "--config", tiny_file, "--workdir", str(tmp_path / "run")]) == 0
  state = tmp_path / "run" / "checkpoints" / "3" / "state"
  # Without its checksums (a run killed before they were written, or one from before they existed), a step is read
  # with orbax's own checks.
  (state.parent / "checksums.json").unlink()
  shutil.rmtree(state / "ocdbt.process_0")
  (state / "manifest.ocdbt").unlink()  # the index of the arrays: gone
  with pytest.raises(FinetuneError, match=r"checkpoints/3: it is damaged or incomplete .*use another step folder"):
    read_checkpoint_arrays(str(state.parent))
  with pytest.raises(FinetuneError) as error:
    Checkpointer(str(tmp_path / "run" / "checkpoints"), 1).restore(3, {"params": {"x": 0}})
  assert "cannot restore checkpoint" in str(error.value) and "\n" not in str(error.value)
  assert len(str(error.value)) < 600  # tensorstore's own message (the array's whole JSON spec) is cut short
  # From the command line the error is all that is printed: no 'Event loop is closed' traceback per array from the
  # tensorstore reads orbax abandons when one fails.
  result = subprocess.run([sys.executable, "-m", "finetune", "train", "--config", tiny_file, "--workdir",
                           str(tmp_path / "w2"), f"--config.init_from={tmp_path / 'run'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert result.stderr.startswith("finetune: error: cannot read checkpoint") and result.stderr.count("\n") == 1, \
      result.stderr
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  assert "holds no checkpoint; train that run first" in _error(
      capsys, ["train", "--config", tiny_file, "--workdir", str(tmp_path / "w"),
               f"--config.init_from={tmp_path / 'empty'}"])


def test_a_checkpoint_file_changed_since_saving_is_named_and_the_step_before_resumes(capsys, tiny_file, tmp_path):
  """Every file of a step is in its checksums.json; one flipped bit in the arrays' data, a cut-short file or a
  missing one is refused with the file named, by every reader. Deleting the step, as the message says, resumes the
  run from the one before."""
  from finetune.checkpoint import (CHECKSUM_FILE, Checkpointer,  # pylint: disable=g-import-not-at-top
                                   read_checkpoint_arrays)
  from finetune.errors import FinetuneError  # pylint: disable=g-import-not-at-top
  command = ["train", "--config", tiny_file, "--workdir", str(tmp_path / "run"), "--config.train.checkpoint_every=1"]
  assert cli.main(command) == 0
  capsys.readouterr()
  step = tmp_path / "run" / "checkpoints" / "3"
  written = sorted(str(p.relative_to(step)) for p in step.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)
  listed = json.loads((step / CHECKSUM_FILE).read_text())["crc32"]
  assert sorted(listed) == written and any("/d/" in name for name in written), (listed, written)
  weights = max((name for name in written if "/d/" in name), key=lambda name: listed[name][0])  # arrays' data
  original = (step / weights).read_bytes()
  damaged = bytearray(original)
  damaged[len(damaged) // 2] ^= 1
  (step / weights).write_bytes(bytes(damaged))
  changed = f"checkpoint {step} is damaged: {weights} changed since it was written"
  with pytest.raises(FinetuneError, match=f"^{re.escape(changed)} .*use another step folder"):
    read_checkpoint_arrays(str(step))  # (init_from, export, eval)
  with pytest.raises(FinetuneError, match=f"^{re.escape(changed)} .*delete that step folder to resume from the one "):
    Checkpointer(str(step.parent), 2).restore(3, {"params": {"x": 0}})  # (a resumed run)
  (step / weights).write_bytes(original[:-1])
  with pytest.raises(FinetuneError, match=re.escape(f"{weights} has {len(original) - 1} bytes, {len(original)} "
                                                    "when it was written")):
    read_checkpoint_arrays(str(step))
  (step / weights).unlink()
  with pytest.raises(FinetuneError, match=re.escape(f"checkpoint {step} is incomplete: {weights} is missing")):
    read_checkpoint_arrays(str(step))
  (step / weights).write_bytes(bytes(damaged))
  # A run killed after step 3 resumes there, finds it damaged, and after the step is deleted resumes from 2.
  (tmp_path / "run" / "summary.json").unlink()
  assert _error(capsys, command).startswith(changed)
  shutil.rmtree(step)
  assert cli.main(command) == 0
  assert json.loads((tmp_path / "run" / "summary.json").read_text())["init"]["resumed_from_step"] == 2
  assert read_checkpoint_arrays(str(step))["params"]  # step 3 written again, with its checksums
  # Off, no step gets a checksums file (and reading one without it is orbax's checks alone, as above).
  assert cli.main([*command[:4], str(tmp_path / "off"), *command[5:], "--config.train.checkpoint_checksums=False"]) == 0
  assert sorted((tmp_path / "off" / "checkpoints").glob(f"*/{CHECKSUM_FILE}")) == []
  # A checksums file listing nothing, or a file outside its step, or not JSON, is damaged itself.
  for text in (json.dumps({"crc32": {}}), json.dumps({"crc32": {"../../config.json": [1, 2]}}), '{"crc32": {'):
    (step / CHECKSUM_FILE).write_text(text)
    with pytest.raises(FinetuneError, match=f"{CHECKSUM_FILE} is damaged .*; use another step folder, or re-run"):
      read_checkpoint_arrays(str(step))


def test_verify_checks_every_step_of_a_workdir_and_names_the_damaged_one(capsys, tiny_file, tmp_path):
  from finetune.checkpoint import CHECKSUM_FILE  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  assert cli.main(["train", "--config", tiny_file, "--workdir", str(workdir), "--config.train.checkpoint_every=1",
                   "--config.train.keep_checkpoints=3"]) == 0
  capsys.readouterr()
  assert cli.main(["verify", "--workdir", str(workdir)]) == 0
  out = capsys.readouterr().out.splitlines()
  assert [line.split(":")[0] for line in out[:-1]] == ["checkpoints/1", "checkpoints/2", "checkpoints/3"]
  assert all(": ok, " in line and line.endswith(" files") for line in out[:-1])
  assert out[-1] == "3 of 3 checkpoint steps match their checksums"
  (workdir / "checkpoints" / "1" / CHECKSUM_FILE).unlink()
  listed = json.loads((workdir / "checkpoints" / "2" / CHECKSUM_FILE).read_text())["crc32"]
  data = next(name for name in listed if "/d/" in name)
  (workdir / "checkpoints" / "2" / data).write_bytes(b"x" * listed[data][0])
  assert cli.main(["verify", "--workdir", str(workdir)]) == 2
  captured = capsys.readouterr()
  damage = f"checkpoint {workdir}/checkpoints/2 is damaged: {data} changed since it was written"
  assert captured.out.splitlines()[0] == "checkpoints/1: no checksums"
  assert captured.out.splitlines()[1].startswith(f"checkpoints/2: {damage}")  # (each damaged step's own reason)
  assert captured.out.splitlines()[2].startswith("checkpoints/3: ok, ")
  assert captured.err.startswith(f"finetune: error: 1 of 3 checkpoint steps are damaged; the first: {damage}"), \
      captured.err
  # A sweep whose point is a symbolic link (followed), a checkpoints/ folder with a trailing slash, a step folder.
  (tmp_path / "sweep").mkdir()
  (tmp_path / "sweep" / "point").symlink_to(workdir)
  assert cli.main(["verify", "--workdir", str(tmp_path / "sweep")]) == 2
  assert capsys.readouterr().out.splitlines()[1].startswith(f"point/checkpoints/2: checkpoint {tmp_path}/sweep/")
  assert cli.main(["verify", "--workdir", f"{workdir}/checkpoints/"]) == 2
  assert capsys.readouterr().out.splitlines()[2].startswith("3: ok, ")
  assert cli.main(["verify", "--workdir", str(workdir / "checkpoints" / "3"), "--strict"]) == 0
  files_of_3 = len(json.loads((workdir / "checkpoints" / "3" / CHECKSUM_FILE).read_text())["crc32"])
  assert capsys.readouterr().out.splitlines() == [f"{workdir}/checkpoints/3: ok, {files_of_3} files",
                                                  "1 of 1 checkpoint steps match their checksums"]
  shutil.rmtree(workdir / "checkpoints" / "2")  # (the damaged one) left: 1 without checksums, 3 with
  assert cli.main(["verify", "--workdir", str(workdir)]) == 0
  assert capsys.readouterr().out.splitlines()[-1] == ("1 of 2 checkpoint steps match their checksums; 1 has none "
                                                      "(written without them)")
  assert _error(capsys, ["verify", "--workdir", str(workdir), "--strict"]).startswith(
      f"1 of 2 checkpoint steps have no checksums.json (--strict), the first {workdir}/checkpoints/1: copy it again")
  assert _error(capsys, ["verify", "--workdir", str(tmp_path / "nothing")]).endswith(
      "is not a folder; give a workdir or run folder")
  # A finished stage without its final step: verify names it, and every reader of the stage's result refuses (the
  # newest step left was read as the result, silently).
  shutil.rmtree(workdir / "checkpoints" / "3")
  assert cli.main(["verify", "--workdir", str(workdir)]) == 2
  captured = capsys.readouterr()
  assert captured.out.splitlines()[1] == (f"checkpoints/3: {workdir}/checkpoints/3 is missing: the stage finished at "
                                          "step 3 (summary.json) and that step holds its result")
  assert "finetune: error: 1 of 2 checkpoint steps are damaged" in captured.err
  missing = (f"{workdir} finished at step 3 (summary.json), but its final checkpoint {workdir}/checkpoints/3 is "
             f"missing: copy that step folder back, or train the stage again (delete {workdir}); its other steps (1) "
             "are intermediate checkpoints")
  assert _error(capsys, ["eval", "--workdir", str(workdir)]).startswith(missing)
  with pytest.raises(FinetuneError, match=re.escape(missing)):  # (export's, for a model it can export)
    latest_checkpoint(str(workdir), "export")
  with pytest.raises(FinetuneError, match=re.escape(missing)):  # (init_from's)
    resolve_checkpoint(str(workdir), str(tmp_path))
  assert resolve_checkpoint(str(workdir / "checkpoints" / "1"), str(tmp_path)).endswith("checkpoints/1")
  (workdir / "summary.json").write_text("{}")  # (damaged: which step is the result is unknown; listed, not fatal)
  assert cli.main(["verify", "--workdir", str(workdir)]) == 2
  assert capsys.readouterr().out.splitlines()[:2] == [
      "checkpoints/1: no checksums", f"checkpoints: {workdir}/summary.json is damaged (no integer steps), so which "
      "checkpoint is the stage's result is unknown: train that stage again"]


def test_processes_of_a_multi_host_resume_split_a_steps_checksum_reads(tmp_path, monkeypatch):
  """Each host restores only its shards, so each verifies only its share of the files (largest first to the least
  loaded); the shares cover every file once and balance the bytes. tests/test_multihost.py resumes with 2
  processes and damage in process 1's share."""
  from finetune import checkpoint  # pylint: disable=g-import-not-at-top
  from finetune.errors import FinetuneError  # pylint: disable=g-import-not-at-top
  step = tmp_path / "7"
  for i, size in enumerate((9000, 5000, 4000, 3000, 100, 100, 0)):
    (step / "state" if i % 2 else step).mkdir(parents=True, exist_ok=True)
    (step / "state" / f"f{i}" if i % 2 else step / f"f{i}").write_bytes(os.urandom(size))
  checkpoint.write_checksums(str(step))
  table = json.loads((step / checkpoint.CHECKSUM_FILE).read_text())["crc32"]
  real_crc32, read = checkpoint._crc32, []
  monkeypatch.setattr(checkpoint, "_crc32", lambda path: read.append(os.path.relpath(path, step)) or real_crc32(path))
  for count in (1, 2, 3, 8):
    shares = []
    for index in range(count):
      read.clear()
      checkpoint._check_files(str(step), table, checkpoint._share(table, index, count))
      shares.append(sorted(read))
    assert sorted(sum(shares, [])) == sorted(table)  # every file once
  assert [sum(table[f][0] for f in checkpoint._share(table, i, 2)) for i in range(2)] == [12000, 9200]
  # Process 0 of 2, the other process simulated: what the collectives return is scripted per round (does process
  # 1 see the table; what did it find). Process 0 reads its share only, and stops with process 1's finding.
  monkeypatch.setattr(checkpoint.jax, "process_count", lambda: 2)
  monkeypatch.setattr(checkpoint.jax, "process_index", lambda: 0)
  monkeypatch.setattr(checkpoint.multihost_utils, "sync_global_devices", lambda name: None)

  def other_process(*rounds):
    answers = iter(rounds)
    monkeypatch.setattr(checkpoint, "_gather_text", lambda text: [text, next(answers)])

  other_process("seen", "")
  read.clear()
  checkpoint.verify_checksums_together(str(step), "the fix")
  assert sorted(read) == sorted(checkpoint._share(table, 0, 2))
  other_process("seen", "checkpoint 7 is damaged: state/f1 changed")
  with pytest.raises(FinetuneError, match=r"^checkpoint 7 is damaged: state/f1 changed; the fix$"):
    checkpoint.verify_checksums_together(str(step), "the fix")
  other_process("", "")  # (process 1's file system does not show it the table yet: process 0 reads every file)
  read.clear()
  checkpoint.verify_checksums_together(str(step), "the fix")
  assert sorted(read) == sorted(table)
  damaged = step / checkpoint._share(table, 0, 2)[0]
  damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
  other_process("seen", "checkpoint 7 is damaged: state/f1 changed")  # (both findings, once each)
  with pytest.raises(FinetuneError, match=f"^checkpoint .*7 is damaged: {damaged.relative_to(step)} changed since it "
                                          r"was written .*; checkpoint 7 is damaged: state/f1 changed; the fix$"):
    checkpoint.verify_checksums_together(str(step), "the fix")


def test_a_finished_async_save_gets_its_checksums_at_the_next_log_step_not_the_next_save(tmp_path):
  """(Written only at the next save or at the end, the newest step of a run killed in between had none: the step
  a resume starts from.) `sum_finished_saves`, called at log steps, writes them once orbax is done, never
  waiting for it."""
  import time  # pylint: disable=g-import-not-at-top
  from finetune.checkpoint import CHECKSUM_FILE, Checkpointer  # pylint: disable=g-import-not-at-top
  checkpoints = Checkpointer(str(tmp_path / "checkpoints"), 2)
  checkpoints.save(1, {"params": {"w": np.arange(1000, dtype=np.float32)}})
  manager = checkpoints._manager  # pylint: disable=protected-access
  in_progress, manager.is_saving_in_progress = manager.is_saving_in_progress, lambda: True
  waited, manager.wait_until_finished = manager.wait_until_finished, None  # (calling it would raise)
  assert not checkpoints.sum_finished_saves()  # a save in progress: no wait, nothing written
  manager.is_saving_in_progress, manager.wait_until_finished = in_progress, waited
  deadline = time.monotonic() + 60
  while not checkpoints.sum_finished_saves():  # False while orbax still writes
    assert time.monotonic() < deadline
    time.sleep(0.01)
  assert (tmp_path / "checkpoints" / "1" / CHECKSUM_FILE).is_file()
  assert not checkpoints.sum_finished_saves()  # nothing left to sum
  checkpoints.close()


def test_the_training_loop_sums_finished_saves_at_its_log_steps(tmp_path, monkeypatch):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from finetune import train as train_lib  # pylint: disable=g-import-not-at-top
  from finetune.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  summed, original = [], Checkpointer.sum_finished_saves

  def recording(self):
    steps = list(self._unsummed)  # pylint: disable=protected-access
    done = original(self)
    summed.extend(steps if done else [])
    return done

  def save_and_let_orbax_finish(self, step, state):  # (so that the next log step finds it done, whatever the load)
    save(self, step, state)
    self._manager.wait_until_finished()  # pylint: disable=protected-access

  save = Checkpointer.save
  monkeypatch.setattr(Checkpointer, "save", save_and_let_orbax_finish)
  monkeypatch.setattr(Checkpointer, "sum_finished_saves", recording)
  train_lib.train_and_evaluate(tiny_config(train={"steps": 8, "log_every": 1, "checkpoint_every": 2}),
                               str(tmp_path))
  assert summed == [2, 4, 6], summed  # each at the log step after it; the last, 8, when the stage ends


def test_only_abandoned_orbax_reads_are_kept_off_stderr(monkeypatch):
  import asyncio  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from finetune import checkpoint  # pylint: disable=g-import-not-at-top
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  checkpoint._silence_abandoned_reads()  # pylint: disable=protected-access
  checkpoint._silence_abandoned_reads()  # installed once  # pylint: disable=protected-access
  loop = asyncio.new_event_loop()
  loop.close()
  for raising in (lambda: loop.call_soon_threadsafe(print), lambda: 1 / 0):
    try:
      raising()
    except Exception as e:  # pylint: disable=broad-except
      sys.unraisablehook(types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__,
                                               err_msg=None, object=None))
  assert [type(args.exc_value) for args in seen] == [ZeroDivisionError]


def test_leftover_config_argument_is_an_error(capsys, tmp_path):
  message = _error(capsys, ["train", "--config", "configs/mnist_transfer.py:stepz=3", "--workdir",
                            str(tmp_path)])
  assert message.startswith("unknown config argument 'stepz' (did you mean 'steps'?)")


def test_signals_are_held_back_while_a_checkpoint_is_written():
  import signal  # pylint: disable=g-import-not-at-top
  from finetune import interrupts  # pylint: disable=g-import-not-at-top
  reached_the_end_of_the_block = False
  # Python's own Ctrl-C handler, whatever the test runner set (pytest-xdist workers ignore SIGINT).
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  with pytest.raises(KeyboardInterrupt):
    with interrupts.deferred():
      os.kill(os.getpid(), signal.SIGINT)
      reached_the_end_of_the_block = True
  assert reached_the_end_of_the_block
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
  signal.signal(signal.SIGINT, previous)


def test_a_signal_delivered_twice_interrupts_once_and_a_later_one_again(monkeypatch):
  """(A terminal's Ctrl-C reaches a sweep's point, and the sweep passes it on as SIGTERM: the second, raised while
  the run was closing, could cut its closing short. A user's later Ctrl-C must still break out.)"""
  import signal  # pylint: disable=g-import-not-at-top
  from finetune import interrupts  # pylint: disable=g-import-not-at-top
  clock = [100.0]
  monkeypatch.setattr(interrupts.time, "monotonic", lambda: clock[0])
  with interrupts.termination_as_interrupt():
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGTERM)
    clock[0] += 1.0
    os.kill(os.getpid(), signal.SIGTERM)  # the same request again: nothing raised
    with pytest.raises(KeyboardInterrupt):  # ... but the loops still see the pending one
      interrupts.raise_if_requested()
    clock[0] += 5.0
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGTERM)
  interrupts.raise_if_requested()  # cleared when the command ends


def test_the_filter_of_abandoned_checkpoint_reads_outlives_the_command(monkeypatch):
  """(The CLI's interrupt hook was put back when a command ended, dropping checkpoint.py's filter installed inside
  it: the tensorstore reads orbax abandons on a damaged checkpoint, finishing later, printed a traceback each.)"""
  import asyncio  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from finetune import checkpoint, interrupts  # pylint: disable=g-import-not-at-top
  printed = []  # what Python's own hook would print
  monkeypatch.setattr(sys, "unraisablehook", printed.append)
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as e:  # what a late tensorstore read raises
    abandoned = types.SimpleNamespace(exc_value=e, exc_traceback=e.__traceback__)
  with interrupts.termination_as_interrupt():
    checkpoint._silence_abandoned_reads()  # pylint: disable=protected-access
  other = types.SimpleNamespace(exc_value=RuntimeError("something else"), exc_traceback=None)
  sys.unraisablehook(abandoned)
  sys.unraisablehook(other)
  assert printed == [other]


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_interrupted_or_preempted_training_prints_one_line_and_resumes(signal_name, tmp_path):
  """Ctrl-C or a scheduler's SIGTERM while checkpoints are written every step: exit 130, one line (before, orbax's
  thread tracebacks for SIGINT; for SIGTERM, death without closing anything), and the same command resumes."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  config = tmp_path / "every_step.py"
  config.write_text(TINY.replace("steps=3, log_every=1, checkpoint_every=0",
                                 "steps=200, log_every=1, checkpoint_every=1, keep_checkpoints=2"))
  command = [sys.executable, "-m", "finetune", "train", "--config", str(config), "--workdir", str(tmp_path / "run")]
  # An ignored SIGINT is inherited (pytest-xdist workers ignore it): the child gets the default disposition back,
  # as a terminal's process has.
  process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  while process.poll() is None and not (tmp_path / "run" / "checkpoints" / "3").is_dir():
    time.sleep(0.01)
  process.send_signal(getattr(signal, signal_name))
  _, err = process.communicate(timeout=120)
  assert process.returncode == 130 and err == ("finetune: interrupted; re-run the same command to resume from the "
                                               "last checkpoint\n"), err[-3000:]
  steps = sorted(int(name) for name in os.listdir(tmp_path / "run" / "checkpoints") if name.isdigit())
  assert len(steps) <= 2 and steps[-1] >= 3  # keep_checkpoints held, no deletion cut short
  resumed = subprocess.run([*command, "--config.train.checkpoint_every=0"], cwd=REPO, capture_output=True, text=True,
                           timeout=300, stdin=subprocess.DEVNULL)  # (a cadence, which may change on resumption)
  assert resumed.returncode == 0 and "resumed_from_step" in (tmp_path / "run" / "summary.json").read_text(), \
      resumed.stderr[-3000:]


def test_an_interrupt_a_library_swallowed_still_ends_the_run(tiny_file, tmp_path, monkeypatch, capsys):
  """A SIGTERM or Ctrl-C whose KeyboardInterrupt is raised inside a garbage-collector callback (jax registers one)
  is printed as "Exception ignored" with a traceback and dropped by Python; the run trained on to its end. The next
  step ends it, and the one line is all that is printed."""
  import gc  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  from finetune import train  # pylint: disable=g-import-not-at-top
  from finetune import interrupts  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)  # Python's own, which prints (pytest's warns)

  def signal_inside_a_gc_callback(phase, info):
    del info
    if phase == "start":
      os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, inside the callback, which swallows it

  def to_global(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      gc.callbacks.append(signal_inside_a_gc_callback)
      try:
        gc.collect()
      finally:
        gc.callbacks.remove(signal_inside_a_gc_callback)
      assert interrupts._requested_at[0] is not None  # (the handler ran and raised, and here we are: dropped)
    return original(*args, **kwargs)

  original = train.to_global
  monkeypatch.setattr(train, "to_global", to_global)
  assert cli.main(["train", "--config", tiny_file, "--workdir", str(tmp_path / "run"),
                   "--config.train.steps=50", "--config.train.checkpoint_every=10"]) == 130
  assert capsys.readouterr().err == ("finetune: interrupted; re-run the same command to resume from the last "
                                     "checkpoint\n")
  assert len(calls) == 3 and not (tmp_path / "run" / "summary.json").exists()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


def test_the_interrupted_line_says_what_re_running_that_command_does(monkeypatch, capsys, tmp_path):
  """(Every command's said it resumes from the last checkpoint: eval, verify and plan have none to resume from.)"""
  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  for name in ("run_verify", "run_eval", "run_sweep"):
    monkeypatch.setattr(cli, name, interrupted)
  assert cli.main(["verify", "--workdir", str(tmp_path)]) == 130
  assert capsys.readouterr().err == "finetune: interrupted; re-run the same command\n"
  assert cli.main(["eval", "--workdir", str(tmp_path)]) == 130
  assert capsys.readouterr().err == "finetune: interrupted; re-run the same command\n"
  assert cli.main(["sweep", "--config", "x.py", "--workdir", str(tmp_path)]) == 130
  assert capsys.readouterr().err == ("finetune: interrupted; re-run the same command: finished points are skipped, "
                                     "the others resume from their last checkpoints\n")


def test_a_stage_closes_its_log_even_when_an_interrupt_cuts_its_checkpoint_close_short():
  """(A second Ctrl-C, re-raised when orbax's finalisation ended, skipped the log's close: wandb never finished.)"""
  import types  # pylint: disable=g-import-not-at-top
  from finetune import train  # pylint: disable=g-import-not-at-top
  closed = []

  def interrupted_close():
    raise KeyboardInterrupt

  opened = types.SimpleNamespace(checkpoints=types.SimpleNamespace(close=interrupted_close),
                                 log=types.SimpleNamespace(close=lambda: closed.append("log")))
  with pytest.raises(KeyboardInterrupt):
    train.OpenStage.close(opened)
  assert closed == ["log"]


def test_eval_scores_a_finished_run_again_on_other_data_and_writes_nothing_into_it(capsys, tiny_file, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  assert cli.main(["train", "--config", tiny_file, "--workdir", str(run)]) == 0
  final = json.load(open(run / "summary.json"))["final"]
  before = {p: os.path.getmtime(p) for p in run.rglob("*")}
  capsys.readouterr()
  out = tmp_path / "eval.json"
  assert cli.main(["eval", "--workdir", str(run), "--stage", "train", "--out", str(out),
                   "--config.data.eval_batch_size=16"]) == 0
  table = capsys.readouterr().out.splitlines()
  assert table[0].split() == ["split", "loss", "accuracy", "examples"] and table[1].startswith("validation")
  # The final weights: the end-of-training evaluation again (other batches: equal up to float rounding).
  results = json.load(open(out))
  assert results["validation"]["accuracy"] == final["validation"]["accuracy"]
  assert results["validation"]["loss"] == pytest.approx(final["validation"]["loss"], rel=1e-5)
  # With each class's scores, as the run's per_class.json has them.
  assert results["validation"].pop("per_class") == json.load(open(run / "per_class.json"))["validation"]
  assert results["validation"]["macro_f1"] == final["validation"]["macro_f1"]
  # Other data: a smaller validation carve (a part of the stage's own validation rows); a larger one would take
  # rows the stage trained on (it was accepted).
  assert cli.main(["eval", "--workdir", str(run), "--out", str(out), "--config.data.validation_fraction=0.05"]) == 0
  assert 0 < json.load(open(out))["validation"]["num_examples"] < final["validation"]["num_examples"]
  assert "config.data.validation_fraction=0.5 would carve rows the stage trained on" in _error(
      capsys, ["eval", "--workdir", str(run), "--config.data.validation_fraction=0.5"])
  # (--out into the run replaced its summary.json; the next `finetune train` there crashed)
  assert f"--out {run / 'summary.json'} is inside the run folder {run}, and eval writes nothing into a run" in _error(
      capsys, ["eval", "--workdir", str(run), "--out", str(run / "summary.json")])
  os.symlink(run, tmp_path / "link")  # (through a link, --out replaced the run's summary.json)
  assert "is inside the run folder" in _error(capsys, ["eval", "--workdir", str(run), "--out",
                                                       str(tmp_path / "link" / "summary.json")])
  assert f"--out {tmp_path / 'no'}/x.json: the folder {tmp_path / 'no'} does not exist" in _error(
      capsys, ["eval", "--workdir", str(run), "--out", str(tmp_path / "no" / "x.json")])
  assert f"--out {tmp_path} is a folder; name a file" in _error(capsys, ["eval", "--workdir", str(run), "--out",
                                                                        str(tmp_path)])
  assert {p: os.path.getmtime(p) for p in run.rglob("*")} == before
  assert "eval may override data.* and mesh.* keys and model.hf_config" in _error(
      capsys, ["eval", "--workdir", str(run), "--config.train.steps=5"])
  assert "the weights were trained on classes ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9'], in that order, " \
         "but the overrides give ['0', '1']" in _error(capsys, ["eval", "--workdir", str(run),
                                                             "--config.data.classes=(0, 1)"])
  os.remove(run / "summary.json")
  assert "has not finished (no summary.json)" in _error(capsys, ["eval", "--workdir", str(run)])
  assert cli.main(["eval", "--workdir", str(run), "--unfinished"]) == 0
