"""Two processes on one machine (a local coordinator, 2 CPU devices each) train and checkpoint one run together,
equal to the same run in one process with 4 devices."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, fake_devices_env
from finetune.checkpoint import CHECKSUM_FILE, _share, read_checkpoint_arrays

CONFIG = '''
def get_config(arg=None):
  return dict(model=dict(name="mlp", input_size=64, hidden=(16,)),
              data=dict(name="digits", batch_size=32, eval_batch_size=64, eval_splits=("validation",)),
              train=dict(steps=6, log_every=2, checkpoint_every=3))
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(config, workdir, devices, process_id=None, port=None, command=None):
  env = {**fake_devices_env(devices), "JAX_PLATFORMS": "cpu"}
  if process_id is not None:
    env.update(FINETUNE_COORDINATOR=f"localhost:{port}", FINETUNE_NUM_PROCESSES="2",
               FINETUNE_PROCESS_ID=str(process_id))
  command = command or ["train", "--config", str(config), "--workdir", str(workdir)]
  return subprocess.Popen([sys.executable, "-m", "finetune", *command], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _run_two(config, workdir, command=None) -> list[tuple[int, str, str]]:
  """(exit status, stdout, stderr) of processes 0 and 1 of one launch (2 CPU devices each), after both end."""
  port = _free_port()
  workers = [_launch(config, workdir, 2, i, port, command) for i in range(2)]
  try:
    outputs = [worker.communicate(timeout=300) for worker in workers]
  finally:  # (one process stuck in a collective the other left would outlive the test)
    for worker in workers:
      worker.kill()
  return [(worker.returncode, out, err) for worker, (out, err) in zip(workers, outputs)]


def test_two_processes_train_and_checkpoint_like_one(tmp_path):
  config = tmp_path / "tiny.py"
  config.write_text(CONFIG)
  outputs = _run_two(config, tmp_path / "two")
  for returncode, _, err in outputs:
    assert returncode == 0, err[-3000:]
  single = _launch(config, tmp_path / "one", 4)
  out, err = single.communicate(timeout=300)
  assert single.returncode == 0, err[-3000:]
  ours = read_checkpoint_arrays(str(tmp_path / "two" / "checkpoints" / "6"))
  reference = read_checkpoint_arrays(str(tmp_path / "one" / "checkpoints" / "6"))
  for path, value in reference["params"].items():
    np.testing.assert_allclose(ours["params"][path], value, rtol=1e-5, atol=1e-6, err_msg=path)
  # Process 0 alone writes the records: the same lines as the one-process run, none twice.
  def steps(run):
    return [(r["step"], r["split"]) for r in map(json.loads, open(tmp_path / run / "metrics.jsonl"))]
  assert steps("two") == steps("one") and len(set(steps("two"))) == len(steps("two"))
  assert "outputs:" in outputs[0][1]
  # A resume verifies the step's checksums with the files split between the processes (each host restores only its
  # shards); damage in process 1's share stops both, with the same message. Resumed undamaged, the run finishes.
  step = tmp_path / "two" / "checkpoints" / "6"
  table = json.loads((step / CHECKSUM_FILE).read_text())["crc32"]
  damaged = step / _share(table, 1, 2)[0]
  original = damaged.read_bytes()
  damaged.write_bytes(bytes([original[0] ^ 1]) + original[1:])
  (tmp_path / "two" / "summary.json").unlink()
  for returncode, _, err in _run_two(config, tmp_path / "two"):
    assert returncode != 0 and f"{damaged.relative_to(step)} changed since it was written" in err, err[-3000:]
  damaged.write_bytes(original)
  for returncode, _, err in _run_two(config, tmp_path / "two"):
    assert returncode == 0, err[-3000:]
  assert json.load(open(tmp_path / "two" / "summary.json"))["init"]["resumed_from_step"] == 6
  # `finetune eval` joins the processes too (it evaluated alone on each host's devices): both processes' metrics,
  # and process 0's --out file, are the one-process run's final evaluation.
  for returncode, out, err in _run_two(None, None, ["eval", "--workdir", str(tmp_path / "two"), "--out",
                                                   str(tmp_path / "eval.json")]):
    assert returncode == 0, err[-3000:]
    assert "Rank 1 is connected" in out + err  # (gloo's report of the second process joining)
  evaluated = json.load(open(tmp_path / "eval.json"))["validation"]
  final = json.load(open(tmp_path / "one" / "summary.json"))["final"]["validation"]
  assert evaluated["num_examples"] == final["num_examples"]
  np.testing.assert_allclose([evaluated["loss"], evaluated["accuracy"]], [final["loss"], final["accuracy"]],
                             rtol=1e-5)
  # `finetune export` on every worker of a launch: process 0 alone exports (all wrote into one folder at once).
  # Export reads and writes files only, so a run of any origin shows it: a tiny ViT (the MLP has no Hugging Face
  # counterpart), trained here in one process.
  (tmp_path / "vit.py").write_text(CONFIG.replace('model=dict(name="mlp", input_size=64, hidden=(16,))',
                                                  'model=dict(name="vit", image_size=8, patch_size=4, width=16, '
                                                  'depth=1, num_heads=2, mlp_dim=32)'))
  trained = _launch(tmp_path / "vit.py", tmp_path / "vit", 1)
  _, err = trained.communicate(timeout=300)
  assert trained.returncode == 0, err[-3000:]
  export = ["export", "--workdir", str(tmp_path / "vit"), "--out", str(tmp_path / "exported")]
  port = _free_port()
  for rank in (1, 0):
    worker = _launch(None, None, 1, rank, port, export)
    out, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err[-3000:]
    if rank:
      assert "process 1 of a multi-process launch; process 0 writes" in out and not (tmp_path / "exported").exists()
  assert json.loads((tmp_path / "exported" / "config.json").read_text())["model_type"] == "vit"


def test_cluster_detection_and_connection_errors(monkeypatch):
  """A shell inside a SLURM allocation (SLURM_NTASKS > 1 without srun's per-task variables) is one process, as in
  JAX's own detection; a task of a multi-task srun step is not. A failed connection is one line naming the fix."""
  import jax  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from finetune import distributed  # pylint: disable=g-import-not-at-top
  from finetune.errors import FinetuneError  # pylint: disable=g-import-not-at-top
  for name in [*distributed.EXPLICIT, "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS",
               "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_ID", "OMPI_COMM_WORLD_RANK",
               *distributed._SLURM_TASK_VARIABLES]:  # pylint: disable=protected-access
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("SLURM_JOB_ID", "123")
  monkeypatch.setenv("SLURM_NTASKS", "2")
  assert distributed.initialize() is False  # sbatch's batch script or salloc's shell: nothing to connect to
  task = {"SLURM_STEP_NODELIST": "node[01-02]", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
  for name, value in task.items():
    monkeypatch.setenv(name, value)
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # a one-task step inside a two-task allocation
  assert distributed.initialize() is False
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")

  def no_coordinator(*args, **kwargs):
    raise ValueError("coordinator_address should be defined.")

  monkeypatch.setattr(jax.distributed, "initialize", no_coordinator)
  with pytest.raises(FinetuneError, match=r"could not connect the processes of a multi-process run \(coordinator_"
                                          r"address should be defined.\); start one process per host"):
    distributed.initialize()
  for name in distributed._SLURM_TASK_VARIABLES:  # pylint: disable=protected-access
    monkeypatch.delenv(name)
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # Open MPI 5's mpirun: JAX's detection needs the ORTE URI
  with pytest.raises(FinetuneError, match=r"Open MPI launch without OMPI_MCA_orte_hnp_uri .* set "
                                          r"FINETUNE_COORDINATOR=<rank 0's host>:<free port>"):
    distributed.initialize()
  monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1:34911")  # Open MPI 4: JAX's own
  with pytest.raises(FinetuneError, match="could not connect the processes"):
    distributed.initialize()
  # A launch's rank without connecting (`finetune export` writes from rank 0 only).
  monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")  # (OMPI_COMM_WORLD_SIZE=2 above)
  assert distributed.launched_process_index() == 1
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
  assert distributed.launched_process_index() == 0
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
  monkeypatch.setenv("TPU_WORKER_ID", "1")
  assert distributed.launched_process_index() == 1
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  # Explicit settings that are not numbers, or an id beyond the count (reported as a failure to connect before).
  monkeypatch.setenv("FINETUNE_COORDINATOR", "localhost:1234")
  for count, rank, message in (("two", "0", r"FINETUNE_NUM_PROCESSES='two' is not a whole number"),
                               ("2", "2", r"FINETUNE_PROCESS_ID=2 must be below FINETUNE_NUM_PROCESSES=2")):
    monkeypatch.setenv("FINETUNE_NUM_PROCESSES", count)
    monkeypatch.setenv("FINETUNE_PROCESS_ID", rank)
    with pytest.raises(FinetuneError, match=message):
      distributed.initialize()


FSDP_ACROSS_PROCESSES = '''
def get_config(arg=None):
  vit = dict(name="vit", image_size=8, patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32)
  return dict(model=vit, data=dict(name="digits", batch_size=32, eval_batch_size=64, eval_splits=("validation",)),
              mesh=dict(data=1, fsdp=4), train=dict(steps=2, log_every=1, checkpoint_every=0),
              stages=dict(pre=dict(),
                          lora=dict(init_from="stage:pre",
                                    regularize=dict(ewc=dict(weight=1.0, num_examples=64), lwf=dict(weight=0.5)),
                                    peft=dict(method="lora", targets=("query", "value"), rank=2,
                                              modules_to_save=("^head/",)))))
'''


@pytest.mark.slow  # (about a minute: two runs of two stages each)
def test_parameters_split_across_processes_finish_the_stage_like_one_process(tmp_path):
  """(With fsdp spanning the processes, no process could fetch the weights: the end of every stage failed after its
  last checkpoint (forgetting evaluation, adapter export), so a re-run failed again; EWC's Fisher and LwF's
  starting model the same way.)"""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  config = tmp_path / "fsdp.py"
  config.write_text(FSDP_ACROSS_PROCESSES)
  for returncode, _, err in _run_two(config, tmp_path / "two"):
    assert returncode == 0, err[-3000:]
  single = _launch(config, tmp_path / "one", 4)
  _, err = single.communicate(timeout=300)
  assert single.returncode == 0, err[-3000:]
  summaries = [json.loads((tmp_path / run / "lora" / "summary.json").read_text()) for run in ("two", "one")]
  assert summaries[0]["forgetting"] == summaries[1]["forgetting"] and summaries[0]["forgetting"]["pre"]
  ours, reference = (load_file(str(tmp_path / run / "lora" / "adapter" / "adapter.safetensors"))
                     for run in ("two", "one"))
  assert ours.keys() == reference.keys() and ours
  for name, value in reference.items():
    np.testing.assert_allclose(ours[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  fisher = [load_file(str(next((tmp_path / run / "pre").glob("fisher-*.safetensors")))) for run in ("two", "one")]
  for name, value in fisher[1].items():
    np.testing.assert_allclose(fisher[0][name], value, rtol=1e-4, atol=1e-9, err_msg=name)
