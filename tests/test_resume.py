"""Kill a run mid-way with SIGKILL, re-run the same command: the result is bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import REPO
from finetune.checkpoint import read_checkpoint_arrays

CONFIG = '''
from finetune.config import ConfigDict

def get_config():
  return ConfigDict(dict(
      model=dict(name="cnn", stem_width=16, widths=(32, 32)),
      data=dict(name="digits", batch_size=64, eval_batch_size=128, eval_splits=("validation",),
                augment=dict(crop_padding=1)),
      train=dict(steps=400, log_every=10, checkpoint_every=25, keep_checkpoints=3),
      optimizer=dict(learning_rate=1e-3, weight_decay=1e-4),
  ))
'''


def _command(config_path, workdir):
  return [sys.executable, "-m", "finetune", "train", "--config", str(config_path), "--workdir", str(workdir),
          "--config.model.dropout=0.1"]  # dropout: the per-step rng must also be reproduced


def _final(workdir):
  return read_checkpoint_arrays(os.path.join(workdir, "checkpoints", "400"))


def test_killed_run_resumes_bit_identical(tmp_path):
  config_path = tmp_path / "config.py"
  config_path.write_text(CONFIG)
  killed, clean = tmp_path / "killed", tmp_path / "clean"

  process = subprocess.Popen(_command(config_path, killed), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if (killed / "checkpoints" / "100").is_dir():  # finalized checkpoint folders have plain step names
      break
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (killed / "summary.json").exists(), "the run finished before it could be killed; make it longer"
  steps_before = sorted(int(s) for s in os.listdir(killed / "checkpoints") if s.isdigit())
  assert 100 <= steps_before[-1] < 400

  for workdir in (killed, clean):
    result = subprocess.run(_command(config_path, workdir), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]

  resumed, uninterrupted = _final(killed), _final(clean)
  for collection in ("params", "model_state"):
    assert resumed[collection].keys() == uninterrupted[collection].keys()
    for path in resumed[collection]:
      np.testing.assert_array_equal(resumed[collection][path], uninterrupted[collection][path], err_msg=path)
  summary = json.load(open(killed / "summary.json"))
  assert summary["init"]["resumed_from_step"] == steps_before[-1]
  clean_final = json.load(open(clean / "summary.json"))["final"]["validation"]
  for key in ("loss", "accuracy", "num_examples"):
    assert summary["final"]["validation"][key] == clean_final[key]
  # Training records after the restored step were dropped and re-written once: no duplicates.
  steps = [json.loads(l)["step"] for l in open(killed / "metrics.jsonl") if json.loads(l)["split"] == "train"]
  assert steps == sorted(set(steps)) and steps[-1] == 400
