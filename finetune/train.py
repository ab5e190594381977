"""`train_and_evaluate(config, workdir)`: the library entry point that the CLI, notebooks and tests all call.

A run is a list of stages (one, named 'train', when the config declares none). Each stage builds its mesh, data,
model shapes (`nnx.eval_shape`: nothing allocated), shardings and optimizer; creates the train state already
sharded (a jitted init with `out_shardings`), or restores it from the stage's latest checkpoint, or initialises
from another run (`init_from` + `dont_load`); then loops the pure jitted train step. A stage whose
`summary.json` exists is complete and is not run again, so re-running a command resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict

from finetune import config as config_lib
from finetune.checkpoint import Checkpointer, load_into, read_checkpoint_arrays, resolve_checkpoint
from finetune.data.pipeline import InputPipeline, build_pipeline, to_global
from finetune.errors import FinetuneError
from finetune.models import build_model, model_kwargs
from finetune.optim import build_optimizer
from finetune.partition import flatten, require_matches
from finetune.reporting import MetricsLog, Progress, write_json
from finetune.sharding import (batch_sharding, data_parallel_size, make_mesh, replicated, rules_from_config,
                               state_shardings)
from finetune.step import TrainState, compile_steps, make_eval_step, make_train_step

SUMMARY_FILE = "summary.json"


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, dict[str, Any]]:
  """Runs every stage of `config` under `workdir`; returns {stage: summary} (see `run_stage`)."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  stages = config_lib.stage_configs(config)
  single = len(stages) == 1 and not len(config.stages)
  if not single:  # (a single stage writes and checks workdir/config.json itself)
    _check_same_config(os.path.join(workdir, "config.json"), config)
    write_text(os.path.join(workdir, "config.json"), config_lib.to_json(config))
  summaries = {}
  for name, stage_cfg in stages:
    run_dir = workdir if single else os.path.join(workdir, name)
    summaries[name] = run_stage(stage_cfg, run_dir, workdir, name)
  write_json(os.path.join(workdir, "results.json"), summaries)
  return summaries


@dataclasses.dataclass
class Stage:
  """Everything `run_stage` builds before the loop; tests use `build_stage` to inspect it."""

  pipeline: InputPipeline
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  state_shardings: TrainState
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  total_steps: int
  init_state: Any  # jitted: rng -> TrainState, created sharded

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the train state, without allocating it."""
    shapes = jax.eval_shape(self.init_state, jax.random.PRNGKey(0))
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        shapes, self.state_shardings)


def abstract_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """Global shapes of a batch whose per-process part is `local_batch`, sharded over the data axes."""
  spec = batch_sharding(mesh)
  return {key: jax.ShapeDtypeStruct((value.shape[0] * jax.process_count(), *value.shape[1:]), value.dtype,
                                    sharding=spec) for key, value in local_batch.items()}


def build_stage(cfg: ConfigDict) -> Stage:
  mesh = make_mesh(cfg.mesh)
  rules = rules_from_config(cfg.sharding_rules)
  pipeline = build_pipeline(cfg.data, cfg.seed)
  parallel = data_parallel_size(mesh)
  for key in ("batch_size", "eval_batch_size"):
    if cfg.data[key] % parallel or cfg.data[key] % jax.process_count():
      raise FinetuneError(f"config.data.{key}={cfg.data[key]} is not divisible by the {parallel} data-parallel "
                          f"devices (mesh data x fsdp) and {jax.process_count()} processes; pick a multiple")
  total_steps = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * pipeline.steps_per_epoch))

  model_kwargs(cfg.model, pipeline.num_classes)  # Checked here: errors raised inside eval_shape carry jax noise.

  def create_model(key: jax.Array) -> nnx.Module:
    return build_model(cfg.model, pipeline.num_classes, nnx.Rngs(params=key))

  abstract_model = nnx.eval_shape(lambda: create_model(jax.random.PRNGKey(0)))
  graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
  params_sharding = state_shardings(abstract_params, mesh, rules)
  rest_sharding = state_shardings(abstract_rest, mesh, rules)
  tx, schedule = build_optimizer(cfg.optimizer, total_steps, abstract_params.to_pure_dict())
  abstract_opt = jax.eval_shape(tx.init, abstract_params.to_pure_dict())
  # Optimizer moments are sharded like their parameters; counters and other scalars are replicated.
  opt_sharding = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt, params_sharding,
                                       transform_non_params=lambda _: replicated(mesh))
  shardings = TrainState(step=replicated(mesh), params=params_sharding, model_state=rest_sharding,
                         opt_state=opt_sharding, rng=replicated(mesh))

  def init_state(seed_key: jax.Array) -> TrainState:
    model = create_model(jax.random.fold_in(seed_key, 0))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params = params.to_pure_dict()
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, model_state=rest.to_pure_dict(),
                      opt_state=tx.init(params), rng=jax.random.fold_in(seed_key, 1))

  return Stage(pipeline=pipeline, mesh=mesh, graphdef=graphdef, state_shardings=shardings, tx=tx,
               schedule=schedule, total_steps=total_steps,
               init_state=jax.jit(init_state, out_shardings=shardings))


def initial_state(stage: Stage, cfg: ConfigDict, workdir: str) -> tuple[TrainState, dict[str, Any]]:
  """A fresh train state, with parameters from `cfg.init_from` where given. Returns (state, init report)."""
  state = stage.init_state(jax.random.PRNGKey(cfg.seed))
  if not cfg.init_from:
    return state, {}
  step_dir = resolve_checkpoint(cfg.init_from, workdir)
  arrays = read_checkpoint_arrays(step_dir)
  # Every dont_load regex must match something: a pattern matching nothing is a typo.
  require_matches(cfg.dont_load, [*flatten(state.params), *flatten(state.model_state)], "config.dont_load")
  params, loaded, fresh = load_into(state.params, arrays["params"], cfg.dont_load, "parameter", step_dir)
  model_state, loaded_stats, _ = load_into(state.model_state, arrays.get("model_state", {}), cfg.dont_load,
                                           "model state", step_dir)
  opt_state = jax.jit(stage.tx.init, out_shardings=stage.state_shardings.opt_state)(params)
  state = state.replace(params=params, model_state=model_state, opt_state=opt_state)
  return state, {"source": step_dir, "loaded": len(loaded) + len(loaded_stats), "fresh": fresh}


# Keys that may change between a run and its resumption: they do not change what is computed.
_RESUMABLE_KEYS = ("wandb.", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints")


def _check_same_config(path: str, cfg: ConfigDict) -> None:
  """Resuming with a different config would silently mix two experiments in one directory: refuse."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    before = _dotted(json.load(f))
  now = _dotted(json.loads(config_lib.to_json(cfg)))
  for key in sorted(set(before) | set(now)):
    if key.startswith(_RESUMABLE_KEYS):
      continue
    if before.get(key) != now.get(key):
      raise FinetuneError(f"{os.path.dirname(path)} holds a run whose config differs ({key}: {before.get(key)!r} "
                          f"then, {now.get(key)!r} now); use a new --workdir, or restore the original value")


def _dotted(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_dotted(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def run_stage(cfg: ConfigDict, run_dir: str, workdir: str, name: str = "train") -> dict[str, Any]:
  """Trains and evaluates one stage in `run_dir`. Returns its summary (also written to `summary.json`).

  The summary holds `final` = {split: {'loss', 'accuracy', 'examples_per_s', 'num_examples'}} for every
  evaluation split, training throughput, parameter counts and what was initialised from where.
  """
  os.makedirs(run_dir, exist_ok=True)
  _check_same_config(os.path.join(run_dir, "config.json"), cfg)
  summary_path = os.path.join(run_dir, SUMMARY_FILE)
  if os.path.exists(summary_path):  # Completed earlier: a re-run resumes after it.
    with open(summary_path) as f:
      return json.load(f)
  write_text(os.path.join(run_dir, "config.json"), config_lib.to_json(cfg))
  stage = build_stage(cfg)
  pipeline = stage.pipeline
  abstract = stage.abstract_state()
  train_fn, eval_fn = compile_steps(
      make_train_step(stage.graphdef, stage.tx, stage.schedule, cfg.train.label_smoothing),
      make_eval_step(stage.graphdef, cfg.train.label_smoothing), abstract,
      abstract_batch(pipeline.train_batch(0), stage.mesh),
      abstract_batch(next(iter(pipeline.eval_batches(next(iter(pipeline.eval_splits))))), stage.mesh),
      stage.mesh)
  checkpoints = Checkpointer(os.path.join(run_dir, "checkpoints"), cfg.train.keep_checkpoints)
  log = MetricsLog(run_dir, cfg.wandb, name, cfg.to_dict())
  try:
    start = checkpoints.latest_step()
    init_report: dict[str, Any] = {}
    if start is not None:
      state = TrainState(**checkpoints.restore(start, abstract.as_dict()))
      log.truncate_after(start)
      init_report = {"resumed_from_step": start}
    else:
      start = 0
      state, init_report = initial_state(stage, cfg, workdir)
    state, train_seconds, train_steps_timed = _train_loop(cfg, stage, train_fn, eval_fn, state, start, checkpoints,
                                                          log, name)
    final = {split: evaluate(eval_fn, state, pipeline, split, stage.mesh) for split in pipeline.eval_splits}
    for split, metrics in final.items():
      log.write(stage.total_steps, split, metrics)
    checkpoints.wait()
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    summary = {
        "stage": name,
        "dataset": pipeline.dataset_name,
        "classes": list(pipeline.class_names),
        "num_train_examples": len(pipeline.train),
        "steps": stage.total_steps,
        "train_examples_per_s": (train_steps_timed * pipeline.batch_size / train_seconds) if train_seconds else None,
        "num_params": num_params,
        "init": init_report,
        "final": final,
        "run_dir": run_dir,
    }
    write_json(summary_path, summary)
    return summary
  finally:
    checkpoints.close()
    log.close()


def _train_loop(cfg: ConfigDict, stage: Stage, train_fn, eval_fn, state: TrainState, start: int,
                checkpoints: Checkpointer, log: MetricsLog, name: str) -> tuple[TrainState, float, int]:
  """Steps `start`..total. Returns (state, seconds, steps) of training (steps are compiled ahead of time)."""
  pipeline, total = stage.pipeline, stage.total_steps
  batch_spec = batch_sharding(stage.mesh)
  pending: list[dict[str, jax.Array]] = []
  progress = Progress(total, start, name)
  interval_start, train_seconds, train_steps = time.perf_counter(), 0.0, 0
  try:
    for step in range(start, total):
      batch = to_global(pipeline.train_batch(step), batch_spec)
      state, metrics = train_fn(state, batch)
      pending.append(metrics)
      done = step + 1
      save_now = cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0
      if done % cfg.train.log_every == 0 or done == total or save_now:
        host = jax.device_get(pending)
        now = time.perf_counter()
        _check_finite(host, done, checkpoints)
        train_seconds += now - interval_start
        train_steps += len(host)
        examples_per_s = len(host) * pipeline.batch_size / max(now - interval_start, 1e-9)
        averaged = log_interval(log, done, host, examples_per_s)
        progress.update(len(host), {"loss": averaged["loss"], "accuracy": averaged["accuracy"],
                                    "ex/s": examples_per_s})
        pending = []
        if save_now or done == total:
          checkpoints.save(done, state.as_dict())
        interval_start = time.perf_counter()
      if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != total:
        for split in pipeline.eval_splits:
          log.write(done, split, evaluate(eval_fn, state, pipeline, split, stage.mesh))
        interval_start = time.perf_counter()
    if start == total and checkpoints.latest_step() != total:
      checkpoints.save(total, state.as_dict())
  finally:
    progress.close()
  return state, train_seconds, train_steps


def log_interval(log: MetricsLog, step: int, host_metrics: list[dict[str, Any]],
                 examples_per_s: float | None) -> dict[str, float]:
  """Writes the interval's averaged training metrics (learning rate: its latest value) and returns them."""
  averaged = {key: float(np.mean([m[key] for m in host_metrics])) for key in host_metrics[0]}
  averaged["learning_rate"] = float(host_metrics[-1]["learning_rate"])
  if examples_per_s is not None:
    averaged["examples_per_s"] = examples_per_s
  log.write(step, "train", averaged)
  return averaged


def _check_finite(host_metrics: list[dict[str, Any]], step: int, checkpoints: Checkpointer):
  for offset, metrics in enumerate(host_metrics):
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      bad_step = step - len(host_metrics) + offset + 1
      checkpoints.wait()  # a save already in flight holds a good state: let it finish
      kept = checkpoints.latest_step()
      where = f"the last good checkpoint (step {kept}) in {checkpoints.directory} is intact" if kept is not None \
          else "no checkpoint had been written yet"
      raise FinetuneError(f"loss is {loss} at step {bad_step}; training stopped and {where}. Lower "
                          "config.optimizer.learning_rate or set config.optimizer.grad_clip_norm")


def evaluate(eval_fn, state: TrainState, pipeline: InputPipeline, split: str,
             mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Loss and accuracy over every example of `split` (padding masked out), and examples per second."""
  spec = batch_sharding(mesh)
  start = time.perf_counter()
  totals = None
  for batch in pipeline.eval_batches(split):
    sums = eval_fn(state, to_global(batch, spec))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  seconds = time.perf_counter() - start
  count = float(totals["count"])
  return {"loss": float(totals["loss_sum"]) / count, "accuracy": float(totals["correct"]) / count,
          "num_examples": int(count), "examples_per_s": count / seconds}


def write_text(path: str, text: str) -> None:
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text + "\n")
  os.replace(tmp, path)


def results_table(summaries: dict[str, dict[str, Any]]) -> str:
  """The closing table: stage, dataset (with classes), split, accuracy, examples/s."""
  rows = [("stage", "dataset", "split", "accuracy", "train ex/s", "eval ex/s")]
  for name, summary in summaries.items():
    classes = summary["classes"]
    dataset = f"{summary['dataset']}[{','.join(classes)}]" if len(classes) <= 10 else summary["dataset"]
    train_speed = summary.get("train_examples_per_s")
    for split, metrics in summary["final"].items():
      rows.append((name, dataset, split, f"{metrics['accuracy']:.4f}",
                   f"{train_speed:,.0f}" if train_speed else "-", f"{metrics['examples_per_s']:,.0f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
