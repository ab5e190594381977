"""`train_and_evaluate(config, workdir)`: the library entry point that the CLI, notebooks and tests all call.

A run is a list of stages (one, named 'train', when the config declares none). Each stage builds its mesh, data,
model shapes (`nnx.eval_shape`: nothing allocated), shardings and optimizer; creates the train state already
sharded (a jitted init with `out_shardings`), or restores it from the stage's latest checkpoint, or initialises
from another run (`init_from` + `dont_load`); then loops the pure jitted train step. A stage whose
`summary.json` exists is complete and is not run again, so re-running a command resumes where it stopped.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
import uuid
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict

from finetune import adapters, files, interrupts, scan
from finetune import config as config_lib
from finetune import regularizers
from finetune.regularizers import fisher as fisher_lib
from finetune.regularizers import l2sp as l2sp_lib
from finetune.checkpoint import (DIVERGED_FILE, Checkpointer, diverged_from, load_into, read_checkpoint_arrays,
                                 resolve_checkpoint)
from finetune.data.pipeline import (InputPipeline, build_pipeline, check_token_ids, rehearsal_count, to_global,
                                    with_rehearsal)
from finetune.data.dataset import SubsetSplit
from finetune.errors import FinetuneError
from finetune.models import MODELS, build_model, check_hf_architecture, hf, model_kwargs, vocab_size
from finetune.optim import build_optimizer, carry_over, decays
from finetune.partition import flatten, map_with_path, require_matches
from finetune.reporting import MetricsLog, Progress, read_json, require_wandb, write_json
from finetune.sharding import (batch_sharding, data_parallel_size, make_mesh, optimizer_state_shardings, replicated,
                               rules_from_config, state_shardings, ActivationSharding, check_rule_names,
                               activation_rules_from_config, to_host)
from finetune.methods import feature_cache
from finetune.step import (TrainState, classify, compile_eval_step, compile_train_step, make_eval_step,
                           make_train_step)
from finetune.strategy import Strategy, resolve_strategy, write_table
from finetune.tasks import TASKS

SUMMARY_FILE = "summary.json"
# {checkpoint step: {"seconds", "steps"}}: the training time of the steps up to that checkpoint, over every attempt,
# so a resumed stage's throughput covers all its steps (it timed only the last attempt's: none, when that attempt
# resumed from the final checkpoint).
TIMING_FILE = "timing.json"
# At most this many dispatched steps (or evaluation batches) wait unfinished: the loops block on the oldest beyond
# it. Accelerators need only a couple of queued steps to stay busy, and the host does not pile up batches. On fake
# host devices it also keeps XLA's CPU client away from the queue depth (about 32 programs) at which its thread
# pool can run out and hang in a collective; the pool is sized so that it cannot (finetune/host_devices.py), as a
# burst of small programs outside these loops can still queue that many (benchmarks/cpu_host_device_threads.py).
MAX_STEPS_IN_FLIGHT = 4


def pace(pending: Sequence[Any]) -> None:
  """Called after each dispatched step or batch, `pending` holding the outputs so far: waits on the one
  MAX_STEPS_IN_FLIGHT back, and ends the loop on a Ctrl-C/SIGTERM that a library dropped (finetune/interrupts.py)."""
  if len(pending) > MAX_STEPS_IN_FLIGHT:
    jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT - 1])
  interrupts.raise_if_requested()


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, dict[str, Any]]:
  """Runs every stage of `config` under `workdir`; returns {stage: summary} (see `run_stage`). The workdir is held
  for the run (`files.exclusive_workdir`): another run there at the same time is refused."""
  if not str(workdir).strip():  # (it meant the current folder: a run from the repository wrote into the sources)
    raise FinetuneError("the workdir is empty; give the run a folder of its own")
  with files.exclusive_workdir(os.path.abspath(os.path.expanduser(workdir)), enabled=jax.process_count() == 1):
    require_wandb([stage_cfg for _, stage_cfg in config_lib.stage_configs(config)])
    workdir, stages = prepare_workdir(config, workdir)
    check_stage_inputs(stages, workdir)
    summaries = {}
    for name, stage_cfg, run_dir in stages:
      with held_stage_folder(run_dir, workdir, name):
        summaries[name] = run_stage(stage_cfg, run_dir, workdir, name)
    # Stages of earlier runs that shared the workdir (one variant per run) stay listed, as their folders do.
    results_path = os.path.join(workdir, "results.json")
    earlier = read_json(results_path) if os.path.isfile(results_path) else {}
    results = {name: summary for name, summary in earlier.items()
               if os.path.isfile(os.path.join(workdir, name, SUMMARY_FILE))}
    results.update(summaries)
    write_json(results_path, results)
  return summaries


def held_stage_folder(run_dir: str, workdir: str, name: str) -> contextlib.AbstractContextManager:
  """The stage's folder held while the stage runs (`files.exclusive_workdir`), so that a run started inside it
  (`--workdir <workdir>/<stage>`) before this one reached the stage is found, not mixed into; the workdir's own
  lock covers the other order. A single-stage run's folder is the workdir, held already."""
  if run_dir == workdir:
    return contextlib.nullcontext()
  return files.exclusive_workdir(
      run_dir, enabled=jax.process_count() == 1, check_above=False,
      if_in_use=f"a run started inside stage {name!r}'s folder; wait for it to end or stop it, then run this command "
                "again (finished stages are kept)")


def check_workdir(config: ConfigDict, workdir: str) -> tuple[str, list[tuple[str, ConfigDict, str]]]:
  """(absolute workdir, [(stage, stage config, run dir)]), writing nothing: refuses a workdir whose earlier run is
  of the other layout, another config, or a source retrained since. `finetune sweep` asks it of every point
  before it writes anything."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  stages = config_lib.stage_configs(config)
  single = len(stages) == 1 and not len(config.stages)
  layout = [(name, stage_cfg, workdir if single else os.path.join(workdir, name)) for name, stage_cfg in stages]
  _check_same_layout(workdir, single, [name for name, _ in stages])
  for name, stage_cfg, run_dir in layout:
    check_same_config(os.path.join(run_dir, "config.json"), stage_cfg)
    if stage_cfg.init_from.startswith("stage:"):  # (others are checked when the stage opens)
      check_same_source(run_dir, stage_cfg, workdir, name)
  return workdir, layout


def check_stage_inputs(layout: Sequence[tuple[str, ConfigDict, str]], workdir: str) -> None:
  """Refuses, before any stage trains, an unfinished stage whose files are missing: its data folder
  (config.data.path), a checkpoint it starts from (init_from other than 'stage:'), an adapter it loads
  (peft.load_adapter). Otherwise a typo in the last stage's path failed only after the earlier stages had trained
  (hours, for a pretraining stage). Only existence is checked, and nothing inside the workdir (an earlier stage
  makes it: `init_from=<workdir>/first/checkpoints/6`) nor what another run may still finish. Finished stages are not
  run again, so their inputs may have moved; the first stage to run opens at once, and its own readers say more
  (what a data folder should hold)."""
  import glob  # pylint: disable=g-import-not-at-top
  inside = os.path.abspath(os.path.expanduser(workdir)).rstrip(os.sep) + os.sep
  pending = [(name, cfg) for name, cfg, run_dir in layout if not os.path.isfile(os.path.join(run_dir, SUMMARY_FILE))]
  for name, cfg in pending[1:]:
    init_from = "" if cfg.init_from.startswith("stage:") else cfg.init_from
    for key, path in (("config.data.path", cfg.data.path), ("config.peft.load_adapter", cfg.peft.load_adapter),
                      ("config.init_from", init_from)):
      full = os.path.abspath(os.path.expanduser(path)) if path else ""
      # (A URL, as TFDS's gs:// data_dir, is left to its reader; a glob, as hf_files takes, must match something.)
      if not path or "://" in path or full.startswith(inside):
        continue
      if not (glob.glob(full) if glob.has_magic(full) else os.path.exists(full)):
        raise FinetuneError(f"stage {name!r}: {key} {path!r} does not exist (looked for {full}); correct the path, "
                            "or make the files first")


def prepare_workdir(config: ConfigDict, workdir: str) -> tuple[str, list[tuple[str, ConfigDict, str]]]:
  """`check_workdir`, then the workdir and, for a multi-stage run, workdir/config.json are written."""
  workdir, layout = check_workdir(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  if len(layout) > 1 or layout[0][2] != workdir:  # (a single stage writes workdir/config.json itself)
    write_text(os.path.join(workdir, "config.json"), config_lib.to_json(config))
  return workdir, layout


@dataclasses.dataclass
class Stage:
  """Everything a stage needs before its loop, built from shapes only. Tests and the planner use it too.

  Per unfreezing phase (see methods/unfreezing.py) the optimizer, the state shardings and the compiled train step
  differ; they are built on first use and cached.
  """

  cfg: ConfigDict
  pipeline: InputPipeline
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  strategy: Strategy
  total_steps: int
  params_sharding: Any
  model_state_sharding: Any
  abstract_params: Any  # pure dict of ShapeDtypeStruct, in the stored layout (stacked when scan_layers)
  create_model: Callable[[jax.Array], nnx.Module]
  abstract_model: nnx.Module = None  # unrolled (scanned layers shown layer by layer), for path-based choices
  layout: scan.Layout = scan.Layout()  # stacked layers (config.train.scan_layers); empty otherwise
  base_paths: frozenset[str] = frozenset()  # parameter paths of the model without PEFT adapters
  peft_info: dict = dataclasses.field(default_factory=dict)
  anchors: Any = None  # abstract constants of the forgetting regularizers (finetune/regularizers), if any
  forward: Callable[..., jax.Array] = classify  # feature caching swaps in the head alone
  keep_float32: tuple[str, ...] = ()  # anchored regexes of the stored paths config.train.float32_params keeps
  _cache: dict = dataclasses.field(default_factory=dict)

  def _cached(self, key, make):
    if key not in self._cache:
      self._cache[key] = make()
    return self._cache[key]

  @property
  def view_params(self) -> Any:
    """Abstract parameters in the unrolled layout that strategies, optimizers and regularizers are written in."""
    return self.layout.view_shapes(self.abstract_params)

  @property
  def view_shardings(self) -> Any:
    return self.layout.view_shardings(self.params_sharding)

  def optimizer(self, phase: int, lr_scale: Any = None) -> tuple[optax.GradientTransformation, dict[str, Callable]]:
    """Over the optimizer's view of the parameters (`scan.Layout.opt_view`: the parameters themselves unless
    scanned). `lr_scale` (possibly traced; not cached) multiplies every learning rate."""
    make = lambda: build_optimizer(self.cfg.optimizer, self.strategy, phase, self.total_steps,
                                   self.layout.opt_view_shapes(self.abstract_params), self.layout.path_of, lr_scale)
    return make() if lr_scale is not None else self._cached(("optimizer", phase), make)

  def state_shardings(self, phase: int) -> TrainState:
    def make():
      tx, _ = self.optimizer(phase)
      opt_params = self.layout.opt_view_shapes(self.abstract_params)
      abstract_opt = jax.eval_shape(tx.init, opt_params)
      opt_sharding = optimizer_state_shardings(abstract_opt, self.layout.opt_view_shardings(self.params_sharding),
                                               opt_params, self.mesh)
      return TrainState(step=replicated(self.mesh), params=self.params_sharding,
                        model_state=self.model_state_sharding, opt_state=opt_sharding, rng=replicated(self.mesh),
                        anchors=self.anchor_shardings())
    return self._cached(("shardings", phase), make)

  def anchor_shardings(self) -> Any:
    """Regularizer constants mirror parameters (an anchor under a parameter's path shares its sharding)."""
    if self.anchors is None:
      return None
    return optimizer_state_shardings(self.anchors, self.view_shardings, self.view_params, self.mesh)

  def init_state(self, phase: int = 0):
    """jitted: seed key -> TrainState, created already sharded."""
    def make():
      tx, _ = self.optimizer(phase)

      def init(seed_key: jax.Array) -> TrainState:
        # The seed key's children: 0 initialises the model, 1 roots the train steps' dropout keys, and 2 the
        # Fisher's sampled labels (fisher_key); each a stream of its own.
        model = self.create_model(jax.random.fold_in(seed_key, 0))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        params = params.to_pure_dict()
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=rest.to_pure_dict(),
                          opt_state=tx.init(self.layout.opt_view(params)), rng=jax.random.fold_in(seed_key, 1))

      return jax.jit(init, out_shardings=self.state_shardings(phase).replace(anchors=None))
    return self._cached(("init", phase), make)

  def abstract_state(self, phase: int = 0) -> TrainState:
    """Shapes, dtypes and shardings of the train state in `phase`, without allocating it."""
    shapes = jax.eval_shape(self.init_state(phase), jax.random.PRNGKey(0)).replace(anchors=self.anchors)
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        shapes, self.state_shardings(phase))

  def step_fn(self, phase: int, lr_scale: Any = None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure train step of `phase`, not compiled. `lr_scale` (possibly traced) multiplies every learning rate
    (`finetune.vmap`: one program for points that differ in learning rate)."""
    tx, lr_by_label = self.optimizer(phase, lr_scale)
    return make_train_step(self.graphdef, tx, lr_by_label, self.strategy.trainable(phase),
                           self.strategy.frozen_batch_norm(phase), self.cfg.train.label_smoothing, self.forward,
                           self.cfg.task,
                           regularizers.make_penalty(self.cfg, adapters.effective_weights(self.abstract_model,
                                                                                          self.cfg.peft)),
                           regularizers.needs_features(self.cfg),
                           self.cfg.train.grad_accum_steps, self.cfg.train.compute_dtype, self.layout,
                           self.keep_float32)

  def train_step(self, phase: int):
    """The train step of `phase`, compiled ahead of time."""
    return self._cached(("train_step", phase), lambda: compile_train_step(
        self.step_fn(phase), self.abstract_state(phase), abstract_batch(self.pipeline.train_batch(0), self.mesh),
        self.mesh))

  def eval_step(self):
    def make():
      state = self.abstract_state(0)
      weights = {"params": state.params, "model_state": state.model_state}
      first_split = next(iter(self.pipeline.eval_splits))
      batch = abstract_batch(next(iter(self.pipeline.eval_batches(first_split))), self.mesh)
      return compile_eval_step(make_eval_step(self.graphdef, self.forward, self.cfg.task,
                                              self.cfg.train.compute_dtype, self.keep_float32),
                               weights, batch, self.mesh)
    return self._cached(("eval_step",), make)

  def adopt_eval_step(self, other: "Stage") -> None:
    """Evaluates with `other`'s compiled program: for stages known to build the same one (points trained together,
    finetune/vmap.py), so it compiles once."""
    self._cache[("eval_step",)] = other.eval_step()

  def enter_phase(self, state: TrainState, phase: int) -> TrainState:
    """Moves a state into `phase`: fresh optimizer state for newly trainable labels, the rest carried over. `state`'s
    optimizer state is donated: the caller must not use it again."""
    tx, _ = self.optimizer(phase)
    # One program with the old optimizer state donated: carried labels alias their old buffers and their fresh init
    # is dead code. (Initialising every label beside the old state, then carrying over, held two copies of the
    # optimizer state at each boundary: 1.6x the train state's bytes.)
    move = jax.jit(lambda old, params: carry_over(old, tx.init(self.layout.opt_view(params))),
                   out_shardings=self.state_shardings(phase).opt_state, donate_argnums=0)
    return state.replace(opt_state=move(state.opt_state, state.params))


def abstract_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """Global shapes of a batch whose per-process part is `local_batch`, sharded over the data axes."""
  spec = batch_sharding(mesh)
  return {key: jax.ShapeDtypeStruct((value.shape[0] * jax.process_count(), *value.shape[1:]), value.dtype,
                                    sharding=spec) for key, value in local_batch.items()}


def check_batch_keys(cfg: ConfigDict, pipeline: InputPipeline) -> None:
  """The task and the model read batch entries the data gives (else a KeyError deep inside tracing the step)."""
  given = set(pipeline.train.take(np.arange(1)))
  needs = {f"config.task={cfg.task!r}": TASKS.get(cfg.task).batch_keys,
           f"model {cfg.model.name!r}": getattr(MODELS.get(cfg.model.name), "input_keys", ("image",))}
  for who, keys in needs.items():
    missing = [key for key in keys if key not in given]
    if missing:
      raise FinetuneError(f"{who} reads batch entries {', '.join(keys)}, but data source {cfg.data.name!r} gives "
                          f"{', '.join(sorted(given))}: choose a task and model for this data")


def build_stage(cfg: ConfigDict, evaluation_only: bool = False) -> Stage:
  """`evaluation_only`: a stage built to evaluate weights or read their shapes (`finetune eval`, the forgetting
  evaluation, the EWC Fisher), on data, devices or batch sizes other than those it trained with. Training's own
  checks are skipped, and its strategy has no unfreezing phases: they refused a finished run (`finetune eval` of a
  rehearsal stage, without the rehearsal rows, had fewer steps than its unfreezing schedule; so did a source task
  rebuilt on a target's data or batch size, and the stage failed after training), or blamed a training batch that
  no longer splits over the evaluation's devices."""
  mesh = make_mesh(cfg.mesh)
  rules = rules_from_config(cfg.sharding_rules)
  activations = ActivationSharding(mesh, tuple(activation_rules_from_config(cfg.activation_rules).items()))
  pipeline = build_pipeline(cfg.data, cfg.seed)
  parallel = data_parallel_size(mesh)
  if not evaluation_only and cfg.data.batch_size % (parallel * cfg.train.grad_accum_steps):
    raise FinetuneError(f"config.data.batch_size={cfg.data.batch_size} must split into {cfg.train.grad_accum_steps} "
                        f"micro-batches (train.grad_accum_steps) that divide over the {parallel} data-parallel "
                        "devices; pick a multiple of their product")
  if parallel % jax.process_count():
    # Each process feeds its own slice of the batch (pipeline._local), which needs every process to hold a distinct
    # part of the data-parallel axes.
    raise FinetuneError(f"config.mesh {dict(mesh.shape)} has {parallel} data-parallel devices (data x fsdp) for "
                        f"{jax.process_count()} processes; make data x fsdp a multiple of the process count")
  # (The batch size is checked above; both split over the processes too, as `parallel` does.)
  if cfg.data.eval_batch_size % parallel:
    raise FinetuneError(f"config.data.eval_batch_size={cfg.data.eval_batch_size} is not divisible by the {parallel} "
                        "data-parallel devices (mesh data x fsdp); pick a multiple")
  steps_per_epoch = pipeline.steps_per_epoch
  # The batches attach_regularizers will mix: fewer target rows, more steps per epoch.
  if cfg.rehearsal.fraction > 0 and not evaluation_only:
    target_rows = cfg.data.batch_size - rehearsal_count(cfg.rehearsal.fraction, cfg.data.batch_size)
    steps_per_epoch = len(pipeline.train) // target_rows
  total_steps = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
  model_kwargs(cfg.model, pipeline.num_classes)  # Checked here: errors raised inside eval_shape carry jax noise.
  check_batch_keys(cfg, pipeline)
  vocabulary = vocab_size(cfg.model, pipeline.num_classes)
  if vocabulary is not None:
    check_token_ids(pipeline, vocabulary)

  def create_unrolled(key: jax.Array) -> nnx.Module:
    model = build_model(cfg.model, pipeline.num_classes, nnx.Rngs(params=key))
    if cfg.train.remat:
      model.remat = cfg.train.remat  # read by models.layers.run_blocks in every block loop
    model.activation_sharding = activations  # block-boundary constraints, also read by run_blocks
    # Adapters draw from their own key, so the base weights are those of the same seed without PEFT.
    return adapters.apply(model, cfg.peft, nnx.Rngs(params=jax.random.fold_in(key, 1)))

  def create_model(key: jax.Array) -> nnx.Module:
    # Scanned: the same layers (adapters included) stacked, so the initial weights equal the unrolled model's.
    model = create_unrolled(key)
    return scan.scan_model(model) if cfg.train.scan_layers else model

  try:
    abstract_model = nnx.eval_shape(lambda: create_unrolled(jax.random.PRNGKey(0)))
  except (TypeError, ValueError, ZeroDivisionError) as e:  # values of the right type the model cannot take
    settings = ", ".join(f"{k}={v!r}" for k, v in cfg.model.items() if k not in ("name", "hf_config"))
    reason = str(e).split("\n")[0][:200]
    raise FinetuneError(f"model {cfg.model.name!r} cannot be built from config.model ({settings}): "
                        f"{type(e).__name__}: {reason}; check those values") from e
  stored_model = nnx.eval_shape(lambda: create_model(jax.random.PRNGKey(0))) if cfg.train.scan_layers \
      else abstract_model
  graphdef, abstract_params, abstract_rest = nnx.split(stored_model, nnx.Param, ...)
  params = nnx.state(abstract_model, nnx.Param).to_pure_dict()  # unrolled: what strategies are written in
  peft_trainable, base_paths, peft_info = None, frozenset(flatten(params)), {}
  if adapters.enabled(cfg.peft):
    base_model = nnx.eval_shape(lambda: build_model(cfg.model, pipeline.num_classes, nnx.Rngs(params=0)))
    base_paths = frozenset(flatten(nnx.state(base_model, nnx.Param).to_pure_dict()))
    peft_trainable = adapters.trainable_paths(cfg.peft, list(flatten(params)), base_paths)
  strategy_cfg = config_lib.with_values(cfg, unfreeze=config_lib.defaults().unfreeze) if evaluation_only else cfg
  strategy = resolve_strategy(strategy_cfg, abstract_model, params, total_steps, steps_per_epoch, peft_trainable)
  if peft_trainable is not None:
    # The count of what trains in some phase: PEFT's own choice less freeze rules, `first_n` and the groups
    # gradual unfreezing never reaches (the figure papers' "trainable %" columns report).
    peft_info = adapters.report(cfg.peft, {p: tuple(x.shape) for p, x in flatten(params).items()},
                                strategy.ever_trainable(), base_paths, adapters.quantized_shapes(abstract_model),
                                flatten(params))
  if not evaluation_only:
    check_fresh_parameters_train(cfg, strategy, list(flatten(params)), peft_trainable)
  # A no_decay regex of the config's own that matches nothing is a typo; the defaults (biases, norm scales) may
  # match nothing in a model without them (Llama has no biases).
  default_no_decay = config_lib.defaults().optimizer.no_decay
  require_matches([p for p in cfg.optimizer.no_decay if p not in default_no_decay], list(flatten(params)),
                  "config.optimizer.no_decay")
  layout = scan.Layout.of(stored_model).with_segments(strategy, lambda path: decays(cfg.optimizer, path))
  keep_float32 = float32_paths(cfg.train.float32_params, list(flatten(params)), layout)
  check_rule_names(cfg.sharding_rules, nnx.state(stored_model))
  return Stage(cfg=cfg, pipeline=pipeline, mesh=mesh, graphdef=graphdef, strategy=strategy, total_steps=total_steps,
               params_sharding=state_shardings(abstract_params, mesh, rules),
               model_state_sharding=state_shardings(abstract_rest, mesh, rules),
               abstract_params=abstract_params.to_pure_dict(), create_model=create_model,
               abstract_model=abstract_model, layout=layout, base_paths=base_paths, peft_info=peft_info,
               keep_float32=keep_float32)


def check_fresh_parameters_train(cfg: ConfigDict, strategy: Strategy, paths: Sequence[str],
                                 peft_trainable: frozenset[str] | None = None) -> None:
  """A parameter the stage re-initialises (`dont_load`) and freezes in every phase would keep its random initial
  value for the whole stage: a LoRA stage with dont_load=^head/ and no modules_to_save trained its adapters under a
  random, frozen classifier, and reported the result. Refused."""
  if not cfg.init_from or not cfg.dont_load:
    return
  ever_trained = strategy.ever_trainable()
  fresh = [re.compile(pattern) for pattern in cfg.dont_load]
  stuck = [path for path in paths if path not in ever_trained and any(r.search(path) for r in fresh)]
  if stuck:
    # (PEFT's choice, or the stage's freeze rules / first_n / unfreezing, which also apply under PEFT)
    fix = ("list them in config.peft.modules_to_save (e.g. '^head/', as Hugging Face PEFT does for a classifier)"
           if peft_trainable is not None and any(p not in peft_trainable for p in stuck) else
           "drop the config.freeze rule that covers them, or let config.unfreeze reach their group")
    raise FinetuneError(f"{len(stuck)} parameter(s) that config.dont_load re-initialises are frozen in every phase, "
                        f"so they would keep their random initial values: {', '.join(stuck[:3])}"
                        f"{', ...' if len(stuck) > 3 else ''}. Train them ({fix}) or load them (narrow dont_load)")


def float32_paths(patterns: Sequence[str], unrolled: Sequence[str], layout: scan.Layout) -> tuple[str, ...]:
  """config.train.float32_params (regexes over unrolled paths, as every path choice) -> anchored regexes of the
  stored paths they keep in float32. A scanned stack is cast as a whole, so a pattern keeping some of its layers
  and not others is refused (it was matched against the stored paths, so `layers/0/` failed once scanned)."""
  require_matches(patterns, unrolled, "config.train.float32_params")
  regexes = [re.compile(pattern) for pattern in patterns]
  kept = frozenset(path for path in unrolled if any(r.search(path) for r in regexes))
  stored = layout.stored_paths(kept)
  partial = sorted(stored & layout.stored_paths(frozenset(unrolled) - kept))
  if partial:
    raise FinetuneError(f"config.train.float32_params keeps some layers of {partial[0]} in float32 and not others; "
                        "scanned layers (train.scan_layers) are cast as one stack: match every layer (e.g. "
                        r"'layers/\d+/...') or none")
  return tuple(f"^{re.escape(path)}$" for path in sorted(stored))


def initial_state(stage: Stage, cfg: ConfigDict, workdir: str) -> tuple[TrainState, dict[str, Any]]:
  """A fresh train state (phase 0), with parameters from `cfg.init_from` where given. Returns (state, report)."""
  state = stage.init_state(0)(jax.random.PRNGKey(cfg.seed))
  report: dict[str, Any] = {}
  # Checkpoints and adapters are read in the unrolled layout (scan.py), so they load into the view.
  params, model_state = stage.layout.view(state.params), stage.layout.view(state.model_state)
  if cfg.init_from:
    step_dir = resolve_checkpoint(cfg.init_from, workdir)
    if hf.is_hf_checkpoint(step_dir):
      check_hf_architecture(cfg.model, stage.pipeline.num_classes, step_dir)
    arrays = adapters.fold_source_adapters(step_dir, read_checkpoint_arrays(step_dir), cfg.peft,
                                           list(flatten(params)))
    # Every dont_load regex must match something: a pattern matching nothing is a typo.
    require_matches(cfg.dont_load, [*flatten(params), *flatten(model_state)], "config.dont_load")
    # Parameters a PEFT method added are new by construction: a base checkpoint never holds them.
    added = frozenset(flatten(params)) - stage.base_paths
    arrays = adapters.prepare_checkpoint(cfg.peft, arrays, list(flatten(params)), list(flatten(model_state)),
                                         cfg.seed)
    params, loaded, fresh = load_into(params, arrays["params"], cfg.dont_load, "parameter", step_dir, added)
    model_state, loaded_stats, fresh_stats = load_into(model_state, arrays.get("model_state", {}), cfg.dont_load,
                                                       "model state", step_dir)
    check_head_classes(step_dir, cfg, workdir, [p for p in loaded if p.startswith("head/")],
                       list(stage.pipeline.class_names))
    report = {"source": step_dir, "loaded": len(loaded) + len(loaded_stats), "fresh": fresh}
    if fresh_stats:  # (BatchNorm statistics of dont_load layers start anew too; "loaded" counted the others)
      report["fresh_stats"] = fresh_stats
    # Arrays the checkpoint holds but this model has no place for (layers beyond model.num_layers, an LM's output
    # layer under a classifier, a pooler the pooling does not use) are left out: said here and kept in init.json.
    unused = sorted((set(arrays["params"]) - set(loaded) - set(fresh)) |
                    (set(arrays.get("model_state", {})) - set(loaded_stats) - set(fresh_stats)) |
                    set(arrays.get("unused", ())))  # (a Hugging Face checkpoint's tensors no rule maps: cls.*, ...)
    if unused:
      report["unused"] = unused
      print(f"init_from {step_dir}: {len(unused)} checkpoint array(s) have no place in this model and were not "
            f"loaded: {', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}")
    source_run_id = _run_id(os.path.dirname(os.path.dirname(step_dir)))  # <run>/checkpoints/<step>
    if source_run_id:
      report["source_run_id"] = source_run_id
  if cfg.peft.load_adapter:
    from finetune import peft_format  # pylint: disable=g-import-not-at-top
    arrays, source = peft_format.read_any_adapter(cfg.peft.load_adapter, cfg.model, cfg.peft, stage.abstract_model,
                                                  stage.pipeline.num_classes)
    params = adapters.with_arrays(params, arrays)
    report["adapter"] = {"source": source, "loaded": len(arrays)}
  if report:
    # The random initial state is dropped before the loaded one is placed and its optimizer state made: only the
    # fresh arrays, which `params` holds, survive. (Beside it, the random parameters and optimizer state peaked at
    # 1.67x the steady state's bytes: a model that trains could fail to start.)
    state = state.replace(params=None, model_state=None, opt_state=None)
    state = state.replace(params=jax.device_put(stage.layout.unview(params), stage.params_sharding),
                          model_state=jax.device_put(stage.layout.unview(model_state), stage.model_state_sharding))
    tx, _ = stage.optimizer(0)
    state = state.replace(opt_state=jax.jit(lambda params: tx.init(stage.layout.opt_view(params)),
                                            out_shardings=stage.state_shardings(0).opt_state)(state.params))
  return state, report


def reinitialised_paths(stage: Stage, cfg: ConfigDict, paths: Any,
                        source_paths: Any = frozenset()) -> frozenset[str]:
  """What the stage does not load from its source: `dont_load` matches, and parameters a PEFT method added unless
  the source has them (`source_paths`: a run with the same PEFT settings, whose adapters the stage loads)."""
  return frozenset(p for p in paths if (p not in stage.base_paths and p not in source_paths)
                   or any(re.search(pattern, p) for pattern in cfg.dont_load))


def attach_regularizers(stage: Stage, state: TrainState, cfg: ConfigDict, workdir: str,
                        sources: list[regularizers.Source], resumed: bool) -> tuple[Stage, TrainState]:
  """Builds the regularizers' anchors (and the rehearsal data mix) and puts them into the stage and the state.
  `resumed`: `state` is a restored checkpoint, not the stage's starting point."""
  names = regularizers.active(cfg)
  params = flatten(stage.layout.view(state.params))
  reinitialised = reinitialised_paths(stage, cfg, params, sources[0].params if sources else frozenset())
  start, start_state = {}, {}
  # The stage's starting point, rebuilt (identically) also when resuming: LwF's source model; L2-SP's anchor when
  # an adapter was loaded onto the source's weights (config.peft.load_adapter), which the source does not hold.
  if "lwf" in names or ("l2sp" in names and cfg.peft.load_adapter):
    # (A fresh state is that starting point: building it again would hold two copies, optimizer state included.)
    initial = initial_state(stage, cfg, workdir)[0] if resumed else state
    start = to_host(flatten(stage.layout.view(initial.params)))
    start_state = to_host(flatten(stage.layout.view(initial.model_state)))
  context = regularizers.Context(
      cfg=cfg, shapes={p: tuple(v.shape) for p, v in params.items()}, reinitialised=reinitialised, sources=sources,
      fisher=lambda source: source_fisher(cfg, source), start=start, start_state=start_state,
      peft_added=frozenset(p for p in params if p not in stage.base_paths),
      effective=adapters.effective_weights(stage.abstract_model, cfg.peft))
  check_regularizers_act(stage, context)
  anchors = regularizers.build_anchors(context)
  stage = dataclasses.replace(stage, anchors=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), anchors),
                              _cache={})
  if "rehearsal" in names:
    source = context.nearest("rehearsal")
    if source.cfg is None:
      raise FinetuneError(f"rehearsal replays the earlier task's training data, named by its run's config.json, but "
                          f"{source.name} is a Hugging Face checkpoint with no task data; init_from a run or stage "
                          "that finetune trained on that task, or drop config.rehearsal")
    source_train = build_pipeline(source.cfg.data, source.cfg.seed).train
    stage = dataclasses.replace(stage, pipeline=with_rehearsal(stage.pipeline, source_train, cfg.rehearsal.fraction,
                                                                 cfg.train.grad_accum_steps))
  return stage, state.replace(anchors=jax.device_put(anchors, stage.anchor_shardings()))


def check_regularizers_act(stage: Stage, context: regularizers.Context) -> None:
  """Refuses a regularizer that cannot change what the stage trains, as the run would have reported a regularized
  result that was not: EWC and L2-SP's alpha pull the parameters loaded from the source towards their source
  values (for LoRA, the weights its layers compute with), which do nothing when none of them trains (a frozen
  backbone under a new head; a PEFT method without `effective` that trains only its own parameters, as prompt
  tuning); L2-SP's beta pulls the re-initialised parameters towards 0 (none trains: 0); LwF and rehearsal score the
  backbone's features with the source's frozen head (only the head trains: the backbone's features cannot move)."""
  cfg, l2sp = context.cfg, context.cfg.regularize.l2sp
  active = regularizers.active(cfg)
  if not active or not context.sources:
    return
  ever_trained = stage.strategy.ever_trainable()
  anchoring = [name for name, on in (("config.regularize.ewc", "ewc" in active),
                                     ("config.regularize.l2sp.alpha", l2sp.alpha > 0)) if on]
  anchored_trained = set(ever_trained)
  if adapters.effective_weights(stage.abstract_model, cfg.peft) is not None:
    # The penalties see the weights adapted layers compute with: a kernel changes when its adapters train.
    anchored_trained |= {path.rsplit("/", 1)[0] + "/kernel" for path in ever_trained if path in context.peft_added}
  if anchoring and not set(context.shared(context.nearest(anchoring[0]))) & anchored_trained:
    verb = "anchors" if len(anchoring) == 1 else "anchor"
    raise FinetuneError(
        f"{' and '.join(anchoring)} {verb} the parameters loaded from {context.sources[0].name}, but none of them "
        "trains in this stage (a frozen backbone trains only a new head; prompt, prefix or bottleneck tuning only "
        "their own parameters, which act on no anchored weight): the penalty would be 0. Drop it, train some "
        "loaded parameters (LoRA and IA3 act on them; QLoRA's quantized kernels are not anchored), or, where the "
        "backbone trains at all (prompts, prefixes, bottleneck adapters), use regularize.lwf or rehearsal, which act "
        "on its features")
  # QLoRA: an adapted layer's base is NF4 codes in model state, which the penalties do not read, so its adapters
  # (what changes the backbone) would train unpenalised while the run reported itself regularised (the head only).
  unanchored = sorted({path.rsplit("/", 1)[0] for path in ever_trained if path in context.peft_added
                       and path.rsplit("/", 1)[0] + "/kernel" not in context.shapes})
  if anchoring and unanchored:
    raise FinetuneError(
        f"{' and '.join(anchoring)} cannot anchor the layers QLoRA adapts ({', '.join(unanchored[:2])}"
        f"{', ...' if len(unanchored) > 2 else ''}): their base kernels are stored quantized (config.peft.quantize="
        f"{cfg.peft.quantize!r}), not as parameters the penalty reads, so their adapters would train unpenalised. "
        "Use plain LoRA (config.peft.quantize=''), or regularize.lwf or rehearsal, which act on the features")
  if "lwf" in active:
    # LwF's teacher is this stage's starting point with the source's head: a backbone layer dont_load
    # re-initialised is random there, so it would distil a random network (0.23 source accuracy for the source's
    # 0.75), not the source's function.
    fresh_backbone = sorted(p for p in context.reinitialised if not p.startswith("head/")
                            and p not in context.peft_added)
    if fresh_backbone:
      raise FinetuneError(
          f"config.regularize.lwf distils the source network's outputs, taken from this stage's starting point, but "
          f"config.dont_load re-initialises backbone parameters there ({', '.join(fresh_backbone[:2])}"
          f"{', ...' if len(fresh_backbone) > 2 else ''}): the teacher would be a partly random network. Narrow "
          "dont_load to the head ('^head/'), or use EWC, L2-SP or rehearsal")
  if l2sp.beta > 0:
    new = set(l2sp_lib.new_parameters(context))
    if not new & ever_trained:
      raise FinetuneError(
          "config.regularize.l2sp.beta pulls the weights this stage re-initialises (a new head; not a PEFT "
          "method's own, nor biases and norm scales, which config.optimizer.no_decay exempts) towards 0, but "
          f"{'none of them trains' if new else 'there are none'} in this stage: the penalty would not change. Drop "
          "beta, or re-initialise what should start fresh (config.dont_load) and train it")
  by_features = [name for name, on in (("config.regularize.lwf", "lwf" in active),
                                       ("config.rehearsal", "rehearsal" in active)) if on]
  # (Both score the backbone's features with the source's head, a frozen copy: only what makes the features, every
  # parameter outside head/, can respond to them.)
  if by_features and not any(not path.startswith("head/") for path in ever_trained):
    raise FinetuneError(
        f"{' and '.join(by_features)} score{'s' if len(by_features) == 1 else ''} the backbone's features with "
        f"the source's frozen head, but only the head trains in this stage (the backbone is frozen in every "
        "phase): the penalty reaches no trainable parameter. Drop it, or train some of the backbone (freeze rules, "
        "config.unfreeze, or a PEFT method)")


def on_this_stage_s_devices(source_cfg: ConfigDict, cfg: ConfigDict) -> ConfigDict:
  """An earlier task's config on this stage's mesh, batch sizes and micro-batches, to rebuild that task here: its
  own could not split over these devices (batch 30 on a 4-way data axis), and the stage failed after training."""
  return config_lib.with_values(
      source_cfg, mesh=cfg.mesh, sharding_rules=cfg.sharding_rules, activation_rules=cfg.activation_rules,
      data={**source_cfg.data.to_dict(), "batch_size": cfg.data.batch_size,
            "eval_batch_size": cfg.data.eval_batch_size},
      train={**source_cfg.train.to_dict(), "grad_accum_steps": cfg.train.grad_accum_steps})


def fisher_key(seed: int) -> jax.Array:
  """The root of the Fisher's per-example keys (its `true` mode samples labels) for a source run of `seed`: the
  seed key's child 2. (It was the seed key itself, whose children split from it gave the source model's
  initialisation keys to the first Fisher batch and its dropout keys to the second.)"""
  return jax.random.fold_in(jax.random.PRNGKey(seed), 2)


def source_fisher(cfg: ConfigDict, source: regularizers.Source) -> dict[str, np.ndarray]:
  """The diagonal Fisher of an earlier task at its final weights, from its own training data: loaded from
  `<source run>/fisher-<mode>-<N>-at-<step>.safetensors` when an earlier stage or run computed it at the same
  checkpoint step, else computed and saved."""
  ewc = cfg.regularize.ewc
  path = os.path.join(source.run_dir, f"fisher-{ewc.label_mode}-{ewc.num_examples}-at-{source.step}.safetensors")
  saved = fisher_lib.load(path)
  source_run = _run_id(source.run_dir)
  if saved is not None and saved[1].get("source_run") == source_run:
    return saved[0]  # (another run_id: the source was trained again in that folder since, and this is stale)
  if source.cfg.task != "classification":
    raise FinetuneError(f"the Fisher information (config.regularize.ewc, l2sp.fisher) is estimated from a "
                        f"classifier's outputs; {source.name} is a {source.cfg.task!r} stage. Drop the regularizer "
                        "or use l2sp with fisher=False, which needs no Fisher")
  source_cfg = on_this_stage_s_devices(source.cfg, cfg)
  if source.folded:
    # A PEFT source whose adapters the lineage folded into its base: its function is the plain model's with those
    # weights, and dL/dW of the folded kernel is dL/dW_eff.
    source_cfg = config_lib.with_values(source_cfg, peft=config_lib.defaults().peft)
  source_stage = build_stage(source_cfg, evaluation_only=True)
  pipeline = dataclasses.replace(source_stage.pipeline, eval_batch_size=ewc.batch_size, process_count=1,
                                 process_index=0)
  train = pipeline.train
  # A fixed random subset: training splits are often stored sorted by class.
  chosen = np.sort(np.random.default_rng(0).permutation(len(train))[:ewc.num_examples])
  layout = source_stage.layout  # the Fisher is keyed by unrolled paths, like the source checkpoint's arrays
  # Placed once, sharded as the source stage's (they were sent with every batch, whole, to one device).
  params = jax.device_put(map_with_path(lambda p, _: np.asarray(source.params[p]), source_stage.view_params),
                          source_stage.view_shardings)
  model_state = jax.device_put(layout.unview(map_with_path(lambda p, _: np.asarray(source.model_state[p]),
                                                           layout.view_shardings(source_stage.model_state_sharding))),
                               source_stage.model_state_sharding)
  forward = source_stage.forward

  def apply(params, batch, model_state):  # (the state is an argument: jit would compile a captured one in)
    return forward(nnx.merge(source_stage.graphdef, layout.unview(params), model_state), batch, train=False)

  started = time.perf_counter()
  fisher = fisher_lib.estimate(apply, params, pipeline.ordered_batches(SubsetSplit(train, chosen)), ewc.label_mode,
                               fisher_key(source.cfg.seed), ewc.num_examples, constants=model_state,
                               mesh=source_stage.mesh)
  if jax.process_index() == 0:
    fisher_lib.save(path, fisher, {"label_mode": ewc.label_mode, "num_examples": int(min(len(chosen),
                                                                                          ewc.num_examples)),
                                   "seconds": time.perf_counter() - started, "source_run": source_run})
  return fisher


def evaluate_sources(cfg: ConfigDict, state: TrainState, sources: list[regularizers.Source], stage: Stage,
                     log: MetricsLog) -> dict[str, Any]:
  """Forgetting: each earlier task of the lineage evaluated with this stage's weights and that task's own head
  (the parameters this stage re-initialised, `dont_load`, come from the source). {source: {split: {before, after,
  drop}}}; also written to metrics.jsonl as split 'forgetting/<source>/<split>'. A re-initialised layer's model
  state (BatchNorm statistics) comes from the source with its weights: this stage's, made for its own weights,
  halved the source accuracy of a network whose weights were the source's (0.40 for 0.80)."""
  report = {}
  # A source of another task (a language model under a classifier, say) has no head this model could read.
  sources = [source for source in sources if source.cfg is not None and source.cfg.task == cfg.task
             and os.path.isfile(os.path.join(source.run_dir, SUMMARY_FILE))]
  if not sources:
    return report
  params = to_host(flatten(stage.layout.view(state.params)))
  model_state = to_host(flatten(stage.layout.view(state.model_state)))
  for source in sources:
    summary_path = os.path.join(source.run_dir, SUMMARY_FILE)
    before = read_json(summary_path)["final"]
    eval_cfg = config_lib.with_values(cfg, data=on_this_stage_s_devices(source.cfg, cfg).data)
    eval_stage = build_stage(eval_cfg, evaluation_only=True)
    shapes = {p: tuple(x.shape) for p, x in flatten(eval_stage.view_params).items()}

    def ours(path: str) -> bool:
      return source.carried(path) and not any(re.search(r, path) for r in cfg.dont_load)

    def pick(path: str, _) -> np.ndarray:
      own = params.get(path)
      if own is not None and tuple(own.shape) == shapes[path] and ours(path):
        return own
      return source.params[path]

    def pick_state(path: str, _) -> np.ndarray:  # (the same model: only the classes differ, which no state has)
      return model_state[path] if ours(path) or path not in source.model_state else source.model_state[path]

    layout = eval_stage.layout
    weights = {"params": jax.device_put(layout.unview(map_with_path(pick, eval_stage.view_params)),
                                        eval_stage.params_sharding),
               "model_state": jax.device_put(layout.unview(map_with_path(
                   pick_state, layout.view_shardings(eval_stage.model_state_sharding))),
                                             eval_stage.model_state_sharding)}
    report[source.name] = {}
    for split in eval_stage.pipeline.eval_splits:
      after = evaluate(eval_stage.eval_step(), weights, eval_stage.pipeline, split, eval_stage.mesh)
      log.write(stage.total_steps, f"forgetting/{source.name}/{split}", after)
      if split in before:
        report[source.name][split] = {"before": before[split]["accuracy"], "after": after["accuracy"],
                                      "drop": before[split]["accuracy"] - after["accuracy"]}
  return report


# Keys that may change between a run and its resumption: they do not change what is trained.
# The mesh and sharding rules may change too: a checkpoint restores onto any mesh (orbax reshards on restore), and
# with it the evaluation batch (one that splits over 1 device need not over 8; evaluations are per example).
_RESUMABLE_KEYS = ("wandb.", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.checkpoint_checksums", "train.evaluate_sources", "data.eval_batch_size", "data.cache_dir",
                  "mesh.", "sharding_rules", "activation_rules")


def _has_progressed(run_dir: str) -> bool:
  checkpoint_dir = os.path.join(run_dir, "checkpoints")
  has_checkpoint = os.path.isdir(checkpoint_dir) and any(name.isdigit() for name in os.listdir(checkpoint_dir))
  return has_checkpoint or os.path.exists(os.path.join(run_dir, SUMMARY_FILE))


def _check_same_layout(workdir: str, single: bool, stages: list[str]) -> None:
  """A single-stage run lives in the workdir itself, a multi-stage one in a folder per stage: writing one over the
  other would overwrite the earlier run's config.json and results.json and leave neither usable."""
  if not single and _has_progressed(workdir):
    raise FinetuneError(f"{workdir} holds a single-stage run and this config has stages ({', '.join(stages)}); "
                        "use a new --workdir")
  top_config = os.path.join(workdir, "config.json")
  if single and os.path.isfile(top_config):
    earlier = [name for name in read_json(top_config).get("stages", {}) or {}
               if _has_progressed(os.path.join(workdir, name))]
    if earlier:
      raise FinetuneError(f"{workdir} holds a multi-stage run (stages {', '.join(earlier)}) and this config has one "
                          "stage; use a new --workdir")


def check_same_config(path: str, cfg: ConfigDict) -> None:
  """Resuming with a different config would silently mix two experiments in one directory: refuse.

  Only a run that has progressed (a checkpoint or a summary) is protected: a run that failed before its first
  checkpoint (say, a wrong data path) can be re-run with the config fixed.
  """
  if not _has_progressed(os.path.dirname(path)) or not os.path.exists(path):
    return
  before = dotted(read_json(path))
  now = dotted(json.loads(config_lib.to_json(cfg)))
  # A key added to the framework after the run was written is no difference while it keeps its default.
  default = dotted(json.loads(config_lib.defaults().to_json_best_effort()))
  # With early stopping, evaluations decide where the run ends: their cadence is part of the result.
  stops_early = bool(before.get("train.early_stopping.metric") or now.get("train.early_stopping.metric"))
  for key in sorted(set(before) | set(now)):
    resumable = key.startswith(_RESUMABLE_KEYS) and not (stops_early and key == "train.eval_every")
    if resumable or (key not in before and key in default and now.get(key) == default[key]):
      continue
    if before.get(key) != now.get(key):
      raise FinetuneError(f"{os.path.dirname(path)} holds a run whose config differs ({key}: {before.get(key)!r} "
                          f"then, {now.get(key)!r} now); use a new --workdir, or restore the original value")


def _run_id(run_dir: str | None) -> str | None:
  """The identity of the run in `run_dir` (init.json's run_id), or None (not a run of ours, not started)."""
  path = os.path.join(run_dir, "init.json") if run_dir else ""
  return read_json(path).get("run_id") if path and os.path.isfile(path) else None


def check_head_classes(step_dir: str, cfg: ConfigDict, workdir: str, loaded_head: list[str],
                       classes: list[str]) -> None:
  """A classifier head loaded from `init_from` scores the classes it was trained on, in its order: data with other
  classes (or the same in another order) would be read through the wrong rows, silently. Our runs record their
  classes; a Hugging Face checkpoint names them in config.json's id2label (transformers' LABEL_0, ... name nothing,
  and nor do data files whose labels are bare numbers, so those pairs are not compared)."""
  if not loaded_head or not classes:
    return
  if hf.is_hf_checkpoint(step_dir):
    id2label = hf.read_config(step_dir).get("id2label") or {}
    source = [id2label.get(str(i), id2label.get(i, "")) for i in range(len(id2label))]
    if all(re.fullmatch(r"LABEL_\d+", str(name)) for name in source) or all(c.isdigit() for c in classes):
      return
  else:
    run_dir = _source_run_dir(cfg.init_from, workdir)
    source = trained_classes(run_dir) if run_dir else None
  if source and list(source) != classes:
    raise FinetuneError(f"init_from {step_dir} loads a classifier head trained on classes {list(source)[:10]} but "
                        f"this stage's data has {classes[:10]} (in label order), so the head would score one class "
                        "as another: add '^head/' to config.dont_load to train a new head, or give "
                        "config.data.classes the source's classes in its order")


def trained_classes(run_dir: str) -> list[str] | None:
  """The class names a run trains on, in label order: its summary's, or (unfinished) its init.json's; None for a
  run started before init.json recorded them."""
  for name in (SUMMARY_FILE, "init.json"):
    path = os.path.join(run_dir, name)
    if os.path.isfile(path):
      classes = read_json(path).get("classes")
      if classes is not None:
        return list(classes)
  return None


def _source_run_dir(init_from: str, workdir: str) -> str | None:
  """The run folder of ours that `init_from` names: 'stage:NAME', a run, its checkpoints/ or one step folder."""
  if init_from.startswith("stage:"):
    return os.path.join(workdir, init_from[len("stage:"):])
  path = os.path.abspath(os.path.expanduser(init_from))
  for candidate in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    if os.path.isfile(os.path.join(candidate, "init.json")) and os.path.isdir(os.path.join(candidate, "checkpoints")):
      return candidate
  return None


def check_same_source(run_dir: str, cfg: ConfigDict, workdir: str, name: str) -> None:
  """A stage that has progressed started from one run of its source (`init_from`). Continuing or reusing it after
  that source was retrained (or deleted) would mix two experiments: refuse, naming the stage to delete."""
  init_path = os.path.join(run_dir, "init.json")
  if not cfg.init_from or not _has_progressed(run_dir) or not os.path.isfile(init_path):
    return
  recorded = read_json(init_path).get("source_run_id")
  if recorded is None:  # a Hugging Face checkpoint, or a stage written before run ids
    return
  if _run_id(_source_run_dir(cfg.init_from, workdir)) != recorded:
    raise FinetuneError(f"stage {name!r} ({run_dir}) was trained from an earlier run of {cfg.init_from}, which "
                        f"has since been retrained or deleted; delete {run_dir} to train it again from the new one, "
                        "or use a new --workdir")


def dotted(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(dotted(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


@dataclasses.dataclass
class OpenStage:
  """One stage of one run between its set-up and its summary: what `run_stage` and `vmap.train_points` (several
  runs' stages trained together) share, so both write the same run directories."""

  cfg: ConfigDict
  name: str
  run_dir: str
  stage: Stage
  state: TrainState
  start: int  # the step training continues from (0 when fresh)
  phase: int  # the unfreezing phase of the state's optimizer structure
  checkpoints: Checkpointer
  log: MetricsLog
  init_report: dict[str, Any]
  sources: list
  extraction_seconds: float | None

  def close(self) -> None:
    try:
      self.checkpoints.close()
    finally:  # (a second Ctrl-C while the checkpoint closes must not leave the metrics log unflushed)
      self.log.close()


def run_stage(cfg: ConfigDict, run_dir: str, workdir: str, name: str = "train") -> dict[str, Any]:
  """Trains and evaluates one stage in `run_dir`. Returns its summary (also written to `summary.json`).

  The summary holds `final` = {split: {'loss', 'accuracy', 'examples_per_s', 'num_examples', ...}} for every
  evaluation split (`tasks.evaluation_keys`: a class task's macro_f1 and balanced_accuracy, a token task's
  num_tokens and perplexity), training throughput, parameter counts and what was initialised from where.
  """
  opened = open_stage(cfg, run_dir, workdir, name)
  if isinstance(opened, dict):  # completed earlier
    return opened
  try:
    state, train_seconds, train_steps, stopping = train_loop(opened.stage, opened.state, opened.start, opened.phase,
                                                              opened.checkpoints, opened.log, name, run_dir)
    return finish_stage(opened, state, train_seconds, train_steps, stopping)
  finally:
    opened.close()


def check_early_stopping_split(cfg: ConfigDict, pipeline: InputPipeline) -> None:
  """The split early stopping watches exists (the config check saw it in eval_splits, but a 'validation' split with
  no fraction to carve and none of the source's own is left out by the pipeline: a KeyError at the first
  evaluation, after the first checkpoints). Here, not in build_stage, which also rebuilds earlier tasks' data."""
  metric = cfg.train.early_stopping.metric
  split = metric.partition("/")[0]
  if metric and split not in pipeline.eval_splits:
    fix = ("set config.data.validation_fraction > 0 to carve one from the training data" if split == "validation"
           else f"point config.data at data with a {split!r} split")
    raise FinetuneError(f"config.train.early_stopping.metric={metric!r} watches split {split!r}, which data source "
                        f"{cfg.data.name!r} does not give (evaluated: {', '.join(pipeline.eval_splits)}); {fix}")


def warn_if_warmup_outlasts(cfg: ConfigDict, total_steps: int, strategy: Strategy) -> None:
  """A warning, not an error: a smoke run that shortens a config's steps is a fair use; a full run this short is
  more likely a units slip (epochs read as steps), and its learning rate never reaches its peak. (Here, not in
  build_stage, which also rebuilds earlier tasks' configs to evaluate them.) With unfreeze.schedule='cycle', every
  phase warms up again, so the shortest phase is the length to compare."""
  if strategy.schedule_mode == "cycle" and len(strategy.phases) > 1:
    shortest = min(end - start for start, end in (strategy.phase_span(q, total_steps)
                                                  for q in range(len(strategy.phases))))
    if cfg.optimizer.warmup_steps >= shortest:
      warnings.warn(f"config.optimizer.warmup_steps={cfg.optimizer.warmup_steps} is not below the shortest "
                    f"unfreezing phase ({shortest} steps), and unfreeze.schedule='cycle' warms up again in every "
                    "phase: its learning rate never reaches its peak; lower warmup_steps or unfreeze less often")
      return
  if cfg.optimizer.warmup_steps >= total_steps:
    length = f"config.train.steps={cfg.train.steps}" if cfg.train.steps else (
        f"config.train.epochs={cfg.train.epochs}: {total_steps} steps")
    warnings.warn(f"config.optimizer.warmup_steps={cfg.optimizer.warmup_steps} is not below the stage's length "
                  f"({length}): the learning rate never reaches its peak; lower warmup_steps or train longer")


def _restore_or_init(stage: Stage, cfg: ConfigDict, checkpoints: Checkpointer, run_dir: str,
                     workdir: str) -> tuple[TrainState, int, int, dict[str, Any]]:
  """(state, start step, phase of the saved optimizer state, init report): the latest checkpoint restored (the
  report read back, with 'resumed_from_step'), or a fresh state (init_from loaded) whose report init.json keeps."""
  init_path = os.path.join(run_dir, "init.json")
  start = checkpoints.latest_step()
  if start is not None:
    # The saved optimizer state has the structure of the phase of the last update made, step start - 1.
    saved_phase = stage.strategy.phase_index(max(start - 1, 0))
    state = TrainState(**checkpoints.restore(start, stage.abstract_state(saved_phase).as_dict()))
    if not os.path.isfile(init_path):  # (was "No such file or directory ...; check that path (--workdir, ...)")
      raise FinetuneError(f"{init_path} is missing, but the run has checkpoints: it records how the run started "
                          "(what init_from loaded, the run's identity); restore it, or delete the run folder to redo "
                          "that run")
    init_report = read_json(init_path)
    started_with = init_report.get("classes")  # (absent in runs started before it was recorded)
    if started_with is not None and list(started_with) != list(stage.pipeline.class_names):
      # (the same config reads other data: edited files, or another version's label reading; the labels would
      # be renumbered under the trained head, silently)
      now = list(stage.pipeline.class_names)[:10]
      raise FinetuneError(f"{run_dir} resumes on data whose classes are {now}, but it started with "
                          f"{list(started_with)[:10]} (init.json): the data changed since; restore it, or delete the "
                          "run folder to train it again")
    # (A source that now reads the data otherwise, e.g. a dataset's own validation split where it carved one from
    # train, would resume on other rows under the same config.)
    sizes, started_sizes = _split_sizes(stage.pipeline), init_report.get("examples") or {}
    changed = {split: (started_sizes[split], size) for split, size in sizes.items()
               if split in started_sizes and started_sizes[split] != size}
    if changed:
      what = ", ".join(f"{split} {now} examples (started with {then})" for split, (then, now) in changed.items())
      raise FinetuneError(f"{run_dir} resumes on data whose splits hold {what} (init.json): the data, or how it is "
                          "read, changed since; restore it, or delete the run folder to train it again")
    return state, start, saved_phase, {**init_report, "resumed_from_step": start}
  _clear_diverged(run_dir)  # a diverged attempt before any checkpoint: its marker is not about this one
  state, init_report = initial_state(stage, cfg, workdir)
  # This attempt's identity: a later stage records its source's, so retraining the source is noticed.
  init_report = {"run_id": uuid.uuid4().hex, **init_report, "classes": list(stage.pipeline.class_names),
                 "examples": _split_sizes(stage.pipeline)}
  write_json(init_path, init_report)
  return state, 0, 0, init_report


def _split_sizes(pipeline: InputPipeline) -> dict[str, int]:
  return {"train": len(pipeline.train), **{split: len(data) for split, data in pipeline.eval_splits.items()}}


def _read_sources(cfg: ConfigDict, workdir: str, name: str, resuming: bool) -> list[regularizers.Source]:
  """The earlier tasks of the init_from lineage, for the regularizers and the forgetting evaluation."""
  if not (cfg.init_from and (regularizers.active(cfg) or cfg.train.evaluate_sources)):
    return []
  try:
    return regularizers.lineage(cfg, workdir, hf_weights=bool(regularizers.active(cfg)))
  except FinetuneError as e:
    if not resuming:
      raise
    # Resuming: training continues from this stage's own checkpoint, but the source it started from is read
    # again, and its run may have pruned that step folder since (keep_checkpoints, early stopping's cleanup).
    if regularizers.active(cfg):
      raise FinetuneError(f"stage {name!r} resumes from its own checkpoint, but its regularizers "
                          f"({', '.join(regularizers.active(cfg))}) need the weights it started from, and "
                          f"reading them failed: {e}. Restore that checkpoint folder (its run may have pruned "
                          "it), or start this stage afresh from a checkpoint that is kept") from None
    if jax.process_index() == 0:
      print(f"[{name}] resuming without evaluating the sources it started from (summary.json gets no "
            f"'forgetting'): {e}", file=sys.stderr, flush=True)
    return []


def _with_cached_features(stage: Stage, state: TrainState, run_dir: str) -> Stage:
  """`features.cache`: the frozen backbone run once over the data; the stage then trains the head on its output."""
  cfg = stage.cfg
  feature_cache.check_cacheable(stage.strategy, stage.pipeline, cfg.freeze.train_bn, stage.abstract_model)
  pipeline = feature_cache.cached_pipeline(stage.graphdef, weights_of(state), stage.pipeline, stage.mesh, run_dir,
                                           cfg.features.max_memory_mb)
  return dataclasses.replace(stage, pipeline=pipeline, forward=feature_cache.classify_features, _cache={})


def open_stage(cfg: ConfigDict, run_dir: str, workdir: str, name: str = "train") -> OpenStage | dict[str, Any]:
  """Everything before a stage's loop: its run directory, the stage, and its state (restored from the latest
  checkpoint, or initialised), regularizer anchors and cached features attached. A stage completed earlier
  returns its summary instead. The caller closes the returned `OpenStage`."""
  os.makedirs(run_dir, exist_ok=True)
  check_same_config(os.path.join(run_dir, "config.json"), cfg)
  check_same_source(run_dir, cfg, workdir, name)
  summary_path = os.path.join(run_dir, SUMMARY_FILE)
  if os.path.exists(summary_path):  # Completed earlier: a re-run resumes after it.
    return read_json(summary_path)
  write_text(os.path.join(run_dir, "config.json"), config_lib.to_json(cfg))
  stage = build_stage(cfg)
  warn_if_warmup_outlasts(cfg, stage.total_steps, stage.strategy)
  check_early_stopping_split(cfg, stage.pipeline)
  write_table(stage.strategy, run_dir, name)
  if stage.peft_info and jax.process_index() == 0:
    print(f"[{name}] {adapters.describe(stage.peft_info)}", flush=True)
  checkpoints = Checkpointer(os.path.join(run_dir, "checkpoints"), cfg.train.keep_checkpoints,
                            checksums=cfg.train.checkpoint_checksums)
  stage.layout.write(checkpoints.directory)
  # (wandb names the run after its workdir, and the stage when it has several: every stage of every sweep point was
  # named 'train' or its stage alone.)
  run_label = os.path.basename(workdir.rstrip(os.sep)) + ("" if run_dir == workdir else f"/{name}")
  log = MetricsLog(run_dir, cfg.wandb, name, cfg.to_dict(), display_name=run_label,
                   resuming=checkpoints.latest_step() is not None)
  try:
    state, start, saved_phase, init_report = _restore_or_init(stage, cfg, checkpoints, run_dir, workdir)
    resuming = "resumed_from_step" in init_report
    # Records after the restored step are recomputed identically; final evaluations are always redone.
    log.truncate_after(start, drop_evaluations_at=stage.total_steps)
    sources = _read_sources(cfg, workdir, name, resuming)
    if regularizers.active(cfg):
      stage, state = attach_regularizers(stage, state, cfg, workdir, sources, resuming)
    extraction_seconds = None
    if cfg.features.cache:
      began = time.perf_counter()
      stage = _with_cached_features(stage, state, run_dir)
      extraction_seconds = time.perf_counter() - began
  except BaseException:
    checkpoints.close()
    log.close()
    raise
  return OpenStage(cfg, name, run_dir, stage, state, start, saved_phase, checkpoints, log, init_report, sources,
                   extraction_seconds)


def finish_stage(opened: OpenStage, state: TrainState, train_seconds: float, train_steps_timed: int,
                 stopping: dict[str, Any]) -> dict[str, Any]:
  """Everything after a stage's loop: final evaluation, forgetting, probes, adapter files and `summary.json`."""
  cfg, stage, name, run_dir = opened.cfg, opened.stage, opened.name, opened.run_dir
  pipeline, checkpoints, log = stage.pipeline, opened.checkpoints, opened.log
  per_class = {split: {} for split in pipeline.eval_splits}
  final = {split: evaluate(stage.eval_step(), weights_of(state), pipeline, split, stage.mesh, per_class[split])
           for split in pipeline.eval_splits}
  for split, metrics in final.items():
    log.write(stage.total_steps, split, metrics)
  # Before summary.json: a diverged stage is not finished.
  check_finite_evaluation(final, stage.total_steps, cfg.optimizer, run_dir)
  write_per_class(run_dir, per_class, pipeline.class_names)
  forgetting = evaluate_sources(cfg, state, opened.sources, stage, log) if cfg.train.evaluate_sources else {}
  closed_form = {}
  if cfg.features.closed_form:
    features = pipeline if cfg.features.cache else feature_cache.cached_pipeline(
        stage.graphdef, weights_of(state), pipeline, stage.mesh, run_dir, cfg.features.max_memory_mb)
    closed_form = feature_cache.closed_form_probes(tuple(cfg.features.closed_form), features, cfg.features.l2)
  checkpoints.prune()  # (after the final evaluation checked the newest checkpoint)
  if adapters.enabled(cfg.peft):
    unrolled = to_host(flatten(stage.layout.view(state.params)))  # (on every process: a collective)
    trained = sorted(stage.strategy.trainable(stage.strategy.phase_index(stage.total_steps - 1)) |
                     {p for p in unrolled if p not in stage.base_paths})
    if jax.process_index() == 0:
      adapters.save_adapter(os.path.join(run_dir, "adapter"), unrolled, trained, cfg.peft, cfg.model)
  last_phase = stage.strategy.phase_index(stage.total_steps - 1)
  counts = stage.strategy.counts(last_phase)
  num_params = stage.peft_info.get("total_params", counts["params"]) if stage.peft_info else counts["params"]
  summary = {
      "stage": name,
      "dataset": pipeline.dataset_name,
      "classes": list(pipeline.class_names),
      "class_filter": bool(cfg.data.classes),
      "num_train_examples": len(pipeline.train),
      "steps": stage.total_steps,
      "train_examples_per_s": (train_steps_timed * pipeline.batch_size / train_seconds) if train_seconds else None,
      # (QLoRA's 4-bit base kernels are not nnx.Params: counted from peft_info, as `finetune plan` does)
      "num_params": num_params,
      "trainable_params": counts["trainable"],
      "frozen_params": num_params - counts["trainable"],
      "optimizer_state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(state.opt_state))),
      "phases": [{"start": p.start, "trainable_groups": list(p.trainable_groups)}
                 for p in stage.strategy.phases],
      "init": opened.init_report,
      "peft": stage.peft_info,
      "regularizers": regularizers.active(cfg),
      "forgetting": forgetting,
      "early_stopping": stopping,
      "final": final,
      "closed_form_probes": closed_form,
      "feature_extraction_seconds": opened.extraction_seconds,
      "run_dir": run_dir,
  }
  _clear_diverged(run_dir)  # an earlier attempt's, which this one got past
  write_json(os.path.join(run_dir, SUMMARY_FILE), summary)
  return summary


def train_loop(stage: Stage, state: TrainState, start: int, phase: int, checkpoints: Checkpointer,
                log: MetricsLog, name: str, run_dir: str) -> tuple[TrainState, float, int, dict[str, Any]]:
  """Steps `start`..total from a state in `phase`. Returns (state, seconds, steps of training, early stopping).

  Steps are compiled ahead of time (one program per unfreezing phase), so the timings exclude compilation. With
  `train.early_stopping` the best state (by its metric, at evaluations) is kept in `<run>/best/`; when the metric
  has not improved for `patience` evaluations, or at the end, the stage ends on that state, saved as its final
  checkpoint (step = total steps), so later stages and exports read the best weights.
  """
  cfg, pipeline, total = stage.cfg, stage.pipeline, stage.total_steps
  batch_spec = batch_sharding(stage.mesh)
  pending: list[dict[str, jax.Array]] = []
  progress = Progress(total, start, name)
  train_fn = None
  earlier = timing_before(run_dir, start)  # earlier attempts' training time and steps up to `start`
  train_seconds, train_steps = float(earlier["seconds"]), int(earlier["steps"])
  timer = IntervalTimer()
  stopping = _EarlyStopping(cfg.train.early_stopping, os.path.join(run_dir, "best"), start, total,
                            cfg.train.checkpoint_checksums)
  if stopping.enabled:
    stage.layout.write(stopping.directory)  # best/<step> folders are init_from sources too

  def log_pending(done: int) -> None:
    nonlocal pending, train_seconds, train_steps
    host = jax.device_get(pending)
    seconds = timer.lap()
    check_finite(host, done, checkpoints, cfg.optimizer)
    train_seconds += seconds
    train_steps += len(host)
    examples_per_s = len(host) * pipeline.batch_size / max(seconds, 1e-9)
    averaged = log_interval(log, done, host, examples_per_s, top_label(stage.strategy, phase))
    progress.update(len(host), {"loss": averaged["loss"], "accuracy": averaged["accuracy"], "ex/s": examples_per_s})
    pending = []
    if checkpoints.sum_finished_saves():
      timer.resume()  # (reading a checkpoint back is not training time)

  try:
    for step in range(start, total):
      step_phase = stage.strategy.phase_index(step)
      if train_fn is None or step_phase != phase:
        timer.pause(pending)  # compilation is not training time
        if step_phase != phase:
          state, phase = stage.enter_phase(state, step_phase), step_phase
        train_fn = stage.train_step(phase)
        timer.resume()
      batch = to_global(pipeline.train_batch(step), batch_spec)
      state, metrics = train_fn(state, batch)
      pending.append(metrics)
      pace(pending)
      done = step + 1
      save_now = cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0
      if done % cfg.train.log_every == 0 or done == total or save_now:
        log_pending(done)
      # Evaluations come before the checkpoint of the same step: a run killed in between resumes from the checkpoint
      # before and replays the evaluation (one after the checkpoint would be lost: the resumed loop starts after it).
      # With early stopping the final weights are a candidate too.
      evaluate_now = cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != total
      if evaluate_now or (stopping.enabled and done == total):
        timer.pause(pending)
        results = {split: evaluate(stage.eval_step(), weights_of(state), pipeline, split, stage.mesh)
                   for split in pipeline.eval_splits}
        for split, metrics in results.items():
          if done != total:  # (at the end, metrics.jsonl gets the final evaluation: of the weights the stage keeps)
            log.write(done, split, metrics)
        check_finite_evaluation(results, done, cfg.optimizer, run_dir)
        if stopping.enabled and stopping.update(done, results, state) >= stopping.patience and done != total:
          if pending:  # the steps since the last log line are logged (and checked finite) too
            timer.resume()
            log_pending(done)
          break
        timer.resume()
      if stopping.enabled and done == total:
        pass  # early stopping saves the final state (the best one) itself, at step `total`
      elif save_now or done == total:
        timer.pause(pending)  # saving is not training time
        checkpoints.save(done, state.as_dict())
        record_timing(run_dir, done, train_seconds, train_steps)
        stopping.checkpointed(done)
        timer.resume()
    if stopping.enabled:
      state = stopping.finish(state, stage, total, checkpoints)  # (saves step `total`)
      record_timing(run_dir, total, train_seconds, train_steps)
  finally:
    progress.close()
  return state, train_seconds, train_steps, stopping.report()


def _timing(run_dir: str) -> dict[str, dict[str, float]]:
  """timing.json's entries; a damaged file only loses the earlier attempts' time (said on stderr), never a resume:
  it refused one, and said to delete the run folder, checkpoints and all."""
  path = os.path.join(run_dir, TIMING_FILE)
  if not os.path.isfile(path):
    return {}
  try:
    entries = read_json(path)
  except FinetuneError as e:
    entries = {"damaged": str(e)}
  good = {step: entry for step, entry in entries.items()
          if isinstance(entry, dict) and all(isinstance(entry.get(key), (int, float)) for key in ("seconds", "steps"))}
  if len(good) != len(entries):
    print(f"[train] warning: {path} is damaged; the throughput leaves out the training time of attempts before "
          "this one (the file is written again at the next checkpoint)", file=sys.stderr, flush=True)
  return good


def timing_before(run_dir: str, start: int) -> dict[str, float]:
  """{'seconds', 'steps'} of training up to checkpoint `start` over every earlier attempt (zeros for a fresh run)."""
  return _timing(run_dir).get(str(start), {"seconds": 0.0, "steps": 0})


def record_timing(run_dir: str, step: int, seconds: float, steps: int) -> None:
  """Training time and steps up to the checkpoint of `step`, over every attempt (timing.json), for a resume; called
  after each checkpoint, also drops an earlier attempt's divergence marker this attempt trained past: its later
  checkpoints are as good as any run's (a resume on another mesh got past the bad step, was stopped again, and
  `export --unfinished` still took the checkpoint before the marker)."""
  marked = os.path.join(run_dir, DIVERGED_FILE)
  if os.path.isfile(marked) and step > diverged_from(run_dir):
    _clear_diverged(run_dir)
  if jax.process_index() == 0:
    recent = dict(list(_timing(run_dir).items())[-7:])  # (a resume needs its checkpoint's; older ones are pruned)
    write_json(os.path.join(run_dir, TIMING_FILE), {**recent, str(step): {"seconds": seconds, "steps": steps}})


class IntervalTimer:
  """Training seconds of the steps since the last log line, pauses (a phase's compilation, evaluations) left out.

  Steps run asynchronously, so `pause` first waits for the pending ones: their time ends there, not at the next
  log line. (Resetting the clock after a pause without this counted those steps in no time at all, and evaluating
  every step reported 15 times the throughput.)"""

  def __init__(self):
    self.timed, self.start = 0.0, time.perf_counter()

  def pause(self, pending: list) -> None:
    if pending:
      jax.block_until_ready(pending)
      self.timed += time.perf_counter() - self.start

  def resume(self) -> None:
    self.start = time.perf_counter()

  def lap(self) -> float:
    """The timed seconds since the last lap; starts the next interval."""
    now = time.perf_counter()
    seconds, self.timed, self.start = self.timed + now - self.start, 0.0, now
    return seconds


class _EarlyStopping:
  """Best-so-far tracking for `config.train.early_stopping` (see `train_loop`).

  `best/best.json` lists every evaluation of the metric; `best/<step>/` holds the state of the best one, and also
  the best as of each of the last two regular checkpoints (the latest may still be saving), so a run resumed from
  its checkpoint finds the best state it had then. On resume, evaluations after the checkpoint are forgotten and
  replayed, so a resumed run stops where an uninterrupted one does and ends on the same weights.
  """

  def __init__(self, cfg: ConfigDict, directory: str, start: int, total: int, checksums: bool):
    self.enabled = bool(cfg.metric)
    self.checksums = checksums
    self.total = total  # patience running out at the last step stops nothing: stopped_at stays None
    self.split, _, self.key = cfg.metric.partition("/")
    self.patience, self.sign = cfg.patience, 1.0 if cfg.mode == "max" else -1.0
    self.directory = directory
    self.history: list[tuple[int, float]] = []  # (step, value) of every evaluation
    self.checkpoint_steps = [start]  # regular checkpoints a resume may restore (start: the one this run did)
    self.best_step, self.best_value, self.stopped_at, self.since_best = None, None, None, 0
    if not self.enabled:
      return
    saved_path = os.path.join(directory, "best.json")
    saved = []
    if start > 0 and os.path.isfile(saved_path):
      saved = read_json(saved_path).get("history", [])
    elif os.path.isfile(saved_path) and jax.process_index() == 0:
      os.remove(saved_path)  # from an attempt killed before its first checkpoint: this run starts over
    for step, value in saved:
      if step <= start:  # later evaluations were not kept by the checkpoint we resume from: replayed
        self._record(step, value)
    # Bests from evaluations after `start` (a replay rewrites them), or older than the best as of `start`; with no
    # evaluation up to `start`, every best a killed attempt saved.
    missing = self.best_step not in self._prune({self.best_step}) and self.best_step is not None
    if missing:
      raise FinetuneError(f"{directory}/{self.best_step}, the best state as of checkpoint step {start}, is missing, "
                          "so early stopping cannot resume; delete the stage folder to retrain it, or use a new "
                          "--workdir")

  def _checkpointer(self) -> Checkpointer:
    # keeps every step: pruned by `_prune`
    return Checkpointer(self.directory, None, async_save=False, checksums=self.checksums)

  def _prune(self, keep: set[int | None]) -> list[int]:
    """Deletes the best states of steps not in `keep`; returns the steps left."""
    best = self._checkpointer()
    for step in best.all_steps():
      if step not in keep:
        best.delete(step)
    left = best.all_steps()
    best.close()
    return left

  def _improves(self, value: float, best_value: float | None) -> bool:
    return best_value is None or self.sign * (value - best_value) > 0

  def _record(self, step: int, value: float) -> bool:
    """Adds one evaluation; returns whether it is the new best."""
    self.history.append((step, value))
    improved = self._improves(value, self.best_value)
    if improved:
      self.best_step, self.best_value, self.since_best = step, value, 0
    else:
      self.since_best += 1
    if self.since_best >= self.patience and self.stopped_at is None and step < self.total:
      self.stopped_at = step
    return improved

  def _best_as_of(self, checkpoint_step: int) -> int | None:
    best_step, best_value = None, None
    for step, value in self.history:
      if step <= checkpoint_step and self._improves(value, best_value):
        best_step, best_value = step, value
    return best_step

  def checkpointed(self, step: int) -> None:
    """A regular checkpoint was saved at `step`."""
    if self.enabled:
      self.checkpoint_steps = [self.checkpoint_steps[-1], step]

  def update(self, step: int, results: dict[str, dict[str, float]], state: TrainState) -> int:
    """Records an evaluation; returns the number of evaluations since the best. (The config check made sure the
    metric is one the evaluation reports.)"""
    # Order matters for a kill at any point: the new best state, then the record naming it, then the pruning.
    if self._record(step, results[self.split][self.key]):
      best = self._checkpointer()
      best.save(step, state.as_dict())
      best.close()
    write_json(os.path.join(self.directory, "best.json"), {
        "metric": f"{self.split}/{self.key}", "best_step": self.best_step, "best_value": self.best_value,
        "history": self.history})
    self._prune({self.best_step, *(self._best_as_of(c) for c in self.checkpoint_steps)})
    return self.since_best

  def finish(self, state: TrainState, stage: "Stage", total: int, checkpoints: Checkpointer) -> TrainState:
    """The stage ends on its best state (or on the last one if it never evaluated), saved at step `total`."""
    if self.best_step is not None:
      best = self._checkpointer()
      phase = stage.strategy.phase_index(max(self.best_step - 1, 0))
      restored = best.restore(self.best_step, stage.abstract_state(phase).as_dict(),
                              "early stopping cannot end on its best state: delete the stage folder to retrain it, "
                              "or use a new --workdir")
      best.close()
      state = TrainState(**restored, anchors=state.anchors)
      final_phase = stage.strategy.phase_index(total - 1)
      if final_phase != phase:  # the final checkpoint holds the optimizer state of the last phase
        state = stage.enter_phase(state, final_phase)
    checkpoints.wait()
    if checkpoints.latest_step() != total:  # (step `total` holds only ever this state: train_loop leaves it to us)
      checkpoints.save(total, state.as_dict())
      checkpoints.wait()
    self._prune({self.best_step})  # a resume now starts at `total`: only the best state is needed
    return state

  def report(self) -> dict[str, Any]:
    if not self.enabled:
      return {}
    return {"metric": f"{self.split}/{self.key}", "best_step": self.best_step, "best_value": self.best_value,
            "stopped_at": self.stopped_at}


def weights_of(state: TrainState) -> dict[str, Any]:
  """What evaluation and feature extraction read: parameters and model collections, no optimizer state."""
  return {"params": state.params, "model_state": state.model_state}


def top_label(strategy: Strategy, phase: int = 0) -> str:
  """The label whose learning rate is reported as plain `learning_rate`: the top (output-side) group's, or, in a
  phase where it rests (chain-thaw), the top label training then (it read 0 while other groups trained)."""
  labels = list(strategy.labels())
  trainable = {strategy.label(path) for path in strategy.trainable(phase)}
  training = [label for label in labels if label in trainable]
  if strategy.groups[-1] in training or not training:
    return strategy.groups[-1] if strategy.groups[-1] in labels else labels[-1]
  return training[-1]


def log_interval(log: MetricsLog, step: int, host_metrics: list[dict[str, Any]], examples_per_s: float | None,
                 main_label: str) -> dict[str, float]:
  """Writes the interval's averaged training metrics (learning rates: their latest values) and returns them."""
  averaged = {key: float(np.mean([m[key] for m in host_metrics])) for key in host_metrics[0]}
  for key in host_metrics[-1]:
    if key.startswith("learning_rate/"):
      averaged[key] = float(host_metrics[-1][key])
  averaged["learning_rate"] = averaged[f"learning_rate/{main_label}"]
  if examples_per_s is not None:
    averaged["examples_per_s"] = examples_per_s
  log.write(step, "train", averaged)
  return averaged


def _divergence_fix(optimizer: ConfigDict | None) -> str:
  """What to change after a non-finite loss (clipping is not suggested where it is on already)."""
  clip = "" if optimizer is not None and optimizer.grad_clip_norm else " or set config.optimizer.grad_clip_norm"
  return f"Lower config.optimizer.learning_rate{clip}, in a new --workdir"


def check_finite(host_metrics: list[dict[str, Any]], step: int, checkpoints: Checkpointer,
                 optimizer: ConfigDict | None = None):
  for offset, metrics in enumerate(host_metrics):
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      bad_step = step - len(host_metrics) + offset + 1
      checkpoints.wait()  # a save already in flight holds a good state: let it finish
      # The loss of step s is computed on the weights after s - 1 updates: checkpoint s - 1 made this loss.
      good = [s for s in checkpoints.all_steps() if s < bad_step - 1]
      if good:
        where = f"the last good checkpoint (step {good[-1]}) in {checkpoints.directory} is intact"
      else:
        where = "no good checkpoint had been written yet"
      if bad_step - 1 in checkpoints.all_steps():
        where += f" (step {bad_step - 1} holds the weights that gave this loss)"
      message = f"loss is {loss} at step {bad_step}; training stopped and {where}. {_divergence_fix(optimizer)}"
      _mark_diverged(os.path.dirname(checkpoints.directory), bad_step - 1, message)
      raise FinetuneError(message)


def check_finite_evaluation(results: dict[str, dict[str, float]], step: int,
                            optimizer: ConfigDict | None = None, run_dir: str = "") -> None:
  """Evaluations see the weights after the last update, which no training loss has checked yet. `run_dir`: the
  training run's, marked diverged from `step` on (not given by `finetune eval`, which writes nothing)."""
  for split, metrics in results.items():
    if not math.isfinite(metrics["loss"]):
      message = (f"{split} loss is {metrics['loss']} at step {step}: the weights diverged in the last updates. "
                 f"{_divergence_fix(optimizer)}")
      if run_dir:
        _mark_diverged(run_dir, step, message)
      raise FinetuneError(message)


def _clear_diverged(run_dir: str) -> None:
  path = os.path.join(run_dir, DIVERGED_FILE)
  if jax.process_index() == 0 and os.path.exists(path):
    os.remove(path)


def _mark_diverged(run_dir: str, from_step: int, message: str) -> None:
  """(`export --unfinished` wrote a model from the weights the run had just refused as diverged.)"""
  if jax.process_index() == 0:
    write_json(os.path.join(run_dir, DIVERGED_FILE), {"weights_from_step": from_step, "error": message})


def evaluate(eval_fn, weights: dict[str, Any], pipeline: InputPipeline, split: str, mesh: jax.sharding.Mesh,
             per_class: dict[str, list[Any]] | None = None) -> dict[str, float]:
  """Loss and accuracy over every example of `split` (padding masked out), and examples per second; for a class
  task also macro-F1 and balanced accuracy, with each class's counts put into `per_class` when given
  (`class_metrics`).

  Each batch's sums are added on the host in float64 once that batch is done (the loop waits on the batch
  MAX_STEPS_IN_FLIGHT back anyway): a float32 running total on the device stops counting at 2^24 tokens, and its
  loss sum loses digits long before, on the evaluation sets of language models."""
  spec = batch_sharding(mesh)
  start = time.perf_counter()
  totals: dict[str, Any] = collections.defaultdict(float)  # (floats, and float64 vectors of per-class counts)
  pending = []

  def add(sums: dict[str, jax.Array]) -> None:
    for key, value in jax.device_get(sums).items():
      totals[key] = totals[key] + np.asarray(value, np.float64)

  for batch in pipeline.eval_batches(split):
    pending.append(eval_fn(weights, to_global(batch, spec)))
    pace(pending)
    if len(pending) > MAX_STEPS_IN_FLIGHT:
      add(pending.pop(0))  # (finished: pace waited on it)
  for sums in pending:
    add(sums)
  seconds = time.perf_counter() - start
  if not float(totals["count"]):
    raise FinetuneError(f"the {split} split has nothing to score (no example, or no token the loss counts: every "
                        "answer cut off by data.options.max_length?)")
  count, examples = float(totals["count"]), float(totals["examples"])
  # (tasks.evaluation_keys lists these keys for the config check of early stopping's metric)
  metrics = {"loss": float(totals["loss_sum"]) / count, "accuracy": float(totals["correct"]) / count,
             "num_examples": int(examples), "examples_per_s": examples / seconds}
  if "tokens" in totals:  # token-level task (the task's per_token): also tokens and perplexity
    metrics.update(num_tokens=int(count), perplexity=math.exp(min(metrics["loss"], 50.0)))
  if "class_support" in totals:
    classes = class_metrics(totals["class_support"], totals["class_correct"], totals["class_predicted"])
    metrics.update(macro_f1=classes.pop("macro_f1"), balanced_accuracy=classes.pop("balanced_accuracy"))
    if per_class is not None:
      per_class.update(classes)
  return metrics


PER_CLASS_FILE = "per_class.json"


def write_per_class(run_dir: str, per_class: dict[str, dict[str, list]], class_names: Sequence[str]) -> None:
  """`PER_CLASS_FILE`: each split's per-class counts and scores (`class_metrics`) by class name, beside
  summary.json, whose metrics hold their summaries (macro_f1, balanced_accuracy); none for a token task."""
  if not any(per_class.values()):
    return
  write_json(os.path.join(run_dir, PER_CLASS_FILE), {
      split: {"classes": list(class_names), **scores} for split, scores in per_class.items() if scores})


def class_metrics(support: np.ndarray, correct: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
  """From per-class counts (examples of the class, those predicted right, predictions of it): each class's
  support, recall, precision and F1, and their macro-F1 (the mean F1 over the classes that occur among the labels
  or the predictions, as scikit-learn's f1_score(average='macro') by default) and balanced accuracy (the mean
  recall over the classes with examples). A class without examples has recall None, one never predicted
  precision None; both make its F1 0 where it counts (predicted but absent, or present but never predicted)."""
  recall = [float(c / s) if s else None for c, s in zip(correct, support)]
  precision = [float(c / p) if p else None for c, p in zip(correct, predicted)]
  f1 = [float(2 * c / (s + p)) if s + p else None for c, s, p in zip(correct, support, predicted)]
  present = [value for value in f1 if value is not None]
  recalls = [value for value in recall if value is not None]
  return {"support": [int(s) for s in support], "recall": recall, "precision": precision, "f1": f1,
          "macro_f1": float(np.mean(present)) if present else 0.0,
          "balanced_accuracy": float(np.mean(recalls)) if recalls else 0.0}


def write_text(path: str, text: str) -> None:
  if jax.process_index() != 0:
    return
  files.write_text(path, text + "\n")


def results_table(summaries: dict[str, dict[str, Any]]) -> str:
  """The closing table: stage, dataset (with classes), split, accuracy (and perplexity where a stage models
  tokens: it showed a language model's token accuracy alone), examples/s."""
  perplexity = any("perplexity" in metrics for summary in summaries.values() for metrics in summary["final"].values())
  rows = [("stage", "dataset", "split", "accuracy", *(("perplexity",) if perplexity else ()), "train ex/s",
           "eval ex/s")]
  for name, summary in summaries.items():
    classes = summary["classes"]
    dataset = f"{summary['dataset']}[{','.join(classes)}]" if summary.get("class_filter") else summary["dataset"]
    train_speed = summary.get("train_examples_per_s")
    for split, metrics in summary["final"].items():
      rows.append((name, dataset, split, f"{metrics['accuracy']:.4f}",
                   *((f"{metrics['perplexity']:.2f}" if "perplexity" in metrics else "-",) if perplexity else ()),
                   f"{train_speed:,.0f}" if train_speed else "-", f"{metrics['examples_per_s']:,.0f}"))
    for probe, accuracies in summary.get("closed_form_probes", {}).items():
      for split, accuracy in accuracies.items():
        rows.append((name, dataset, f"{split} ({probe} probe)", f"{accuracy:.4f}", *(("-",) if perplexity else ()),
                     "-", "-"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
