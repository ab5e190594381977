"""Several runs trained together in one jitted program: the train step mapped over a leading point axis
(`jax.vmap`; on XLA:CPU for convolutional models a loop over the points inside the program, `unroll_points`).

A small model cannot fill a machine one run at a time: its step is dominated by per-op dispatch and small matrix
products. Sweep points that share one model shape and differ only in what the step takes as data can instead run
as one program over stacked train states, K points per step:

* `seed`: initial weights, dropout keys and data order are all functions of the seed, and each point's state
  (rng) and batches (its own pipeline) are its own;
* `optimizer.learning_rate`: the step is built once with a per-point `lr_scale` (lr_k / lr_0) multiplying every
  label's schedule, which equals the point's own optimizer because every schedule shape is linear in its peak
  (tests/test_optim.py checks each registered one);
* the forgetting regularizers' strengths (`regularize.ewc.weight`, `regularize.lwf.weight`,
  `regularize.l2sp.alpha/beta`, `rehearsal.weight`), LwF's temperature and online EWC's decay `gamma`: they
  already ride in `TrainState.anchors` as numbers (gamma inside the running Fisher each point computes).

Everything else (model, data, strategy, steps, schedule shape, which regularizers are on) must be equal, else
`incompatibility` says which key differs. Each point keeps its own run directories, exactly as `finetune train`
writes them (config.json, metrics.jsonl, checkpoints, summary.json): only the loop between `train.open_stage` and
`train.finish_stage` is shared, so a point trained together resumes, exports and aggregates like a solo run, and
its results equal the solo run's up to float rounding (tests/test_vmap.py). A point whose loss or evaluation turns
non-finite, or whose stage cannot open (a damaged checkpoint), stops alone; the others go on. Unsupported together
(run solo): early stopping (points would stop at different steps) and cached features.

Speed (benchmarks/vmap_sweep.py, README "Sweeps"): what one program over K points saves is per-step dispatch, a
process start and a compile per point, and on an accelerator the idle width of a small model. On XLA:CPU vmap
turns each convolution with per-point kernels into a grouped convolution, which leaves the fast path, so there
the points of a convolutional model are unrolled instead (`point_map`).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from finetune import config as config_lib
from finetune import files
from finetune import regularizers
from finetune import train as train_lib
from finetune.data.pipeline import to_global
from finetune.errors import FinetuneError
from finetune.reporting import Progress, require_wandb, write_json
from finetune.sharding import batch_sharding, replicated
from finetune.step import TrainState

# Config keys in which points trained together may differ (see the module docstring for why each is exact).
POINT_KEYS = ("seed", "optimizer.learning_rate", "regularize.ewc.weight", "regularize.ewc.gamma",
              "regularize.lwf.weight", "regularize.lwf.temperature", "regularize.l2sp.alpha", "regularize.l2sp.beta",
              "rehearsal.weight")
# Keys each point reads for itself (its wandb run, how many checkpoints it keeps and whether they carry checksums);
# all others are the group's.
# (Not checkpoint_every: a checkpoint step is also a logging step, so one point's cadence would add records to the
# others' metrics.jsonl and change how their intervals are averaged.)
_IGNORED = ("wandb.", "train.keep_checkpoints", "train.checkpoint_checksums")


def incompatibility(a: ConfigDict, b: ConfigDict) -> str:
  """Why runs of configs `a` and `b` cannot train together in one program; '' when they can."""
  stages_a, stages_b = config_lib.stage_configs(a), config_lib.stage_configs(b)
  if [name for name, _ in stages_a] != [name for name, _ in stages_b]:
    return "their stages differ"
  for (name, cfg_a), (_, cfg_b) in zip(stages_a, stages_b):
    where = "" if name == "train" else f"stage {name}: "
    flat_a = train_lib.dotted(json.loads(config_lib.to_json(cfg_a)))
    flat_b = train_lib.dotted(json.loads(config_lib.to_json(cfg_b)))
    for cfg in (cfg_a, cfg_b):
      if cfg.train.early_stopping.metric:
        return f"{where}early stopping would stop points at different steps"
      if cfg.features.cache:
        return f"{where}cached features are not supported together"
    if cfg_a.optimizer.learning_rate != cfg_b.optimizer.learning_rate:  # (equal rates need no lr_scale)
      if cfg_a.optimizer.lr_range or cfg_b.optimizer.lr_range:
        # (the range sets every group's rate, so lr_scale = lr_k / lr_0 would not be the points' ratio)
        return (f"{where}optimizer.learning_rate differs, but optimizer.lr_range sets every group's rate itself "
                "(learning_rate is unused)")
      if min(cfg_a.optimizer.learning_rate, cfg_b.optimizer.learning_rate) <= 0:
        return f"{where}optimizer.learning_rate differs and one is 0: a rate must be > 0 to scale it per point"
    for key in sorted(set(flat_a) | set(flat_b)):
      if key not in POINT_KEYS and not key.startswith(_IGNORED) and flat_a.get(key) != flat_b.get(key):
        return f"{where}{key} differs ({flat_a.get(key)!r} vs {flat_b.get(key)!r})"
    if regularizers.active(cfg_a) != regularizers.active(cfg_b):
      return (f"{where}different regularizers are on ({', '.join(regularizers.active(cfg_a)) or 'none'} vs "
              f"{', '.join(regularizers.active(cfg_b)) or 'none'})")
  return ""


def groups(configs: Sequence[ConfigDict], size: int) -> list[list[int]]:
  """Indices of `configs` in groups of at most `size` that can train together, in order (greedy: each config joins
  the first open group it is compatible with)."""
  result: list[list[int]] = []
  for index, cfg in enumerate(configs):
    for group in result:
      if len(group) < size and not incompatibility(configs[group[0]], cfg):
        group.append(index)
        break
    else:
      result.append([index])
  return result


def train_points(configs: Sequence[ConfigDict], workdirs: Sequence[str]) -> list[dict[str, dict[str, Any]]]:
  """`train.train_and_evaluate(configs[k], workdirs[k])` for every k, with the stages of all points trained
  together (one vmapped program per stage and phase). Returns each point's {stage: summary}.

  Points whose stage was completed earlier skip it; points resuming from different steps train in separate
  groups. A point that fails (a non-finite loss) is left out of the rest and reported at the end: FinetuneError
  naming it, after every other point finished."""
  if len(configs) != len(workdirs) or not configs:
    raise FinetuneError("train_points needs one workdir per config, and at least one point")
  for cfg in configs[1:]:
    reason = incompatibility(configs[0], cfg)
    if reason:
      raise FinetuneError(f"these points cannot train together: {reason}; only {', '.join(POINT_KEYS)} may differ "
                          "(run them as separate `finetune train` commands)")
  workdirs = [os.path.abspath(os.path.expanduser(w)) for w in workdirs]
  if len(set(workdirs)) != len(workdirs):
    raise FinetuneError("train_points: two points share a workdir")
  # (Locked one after another below, a workdir inside another point's would find that lock, held by this very
  # process, and blame another run; locked in the other order, the outer point would train over the inner one.)
  for inner in workdirs:
    for outer in workdirs:
      if inner != outer and os.path.commonpath([inner, outer]) == outer:
        raise FinetuneError(f"train_points: point workdir {inner} is inside point workdir {outer}; give each point a "
                            "folder of its own")
  with contextlib.ExitStack() as held:  # each point's workdir, as `finetune train` holds its own
    for workdir in workdirs:
      held.enter_context(files.exclusive_workdir(workdir, enabled=jax.process_count() == 1))
    return _train_points(configs, workdirs)


def _train_points(configs: Sequence[ConfigDict], workdirs: list[str]) -> list[dict[str, dict[str, Any]]]:
  require_wandb([stage_cfg for cfg in configs for _, stage_cfg in config_lib.stage_configs(cfg)])
  layouts = [train_lib.prepare_workdir(cfg, workdir)[1] for cfg, workdir in zip(configs, workdirs)]
  for layout, workdir in zip(layouts, workdirs):
    train_lib.check_stage_inputs(layout, workdir)
  summaries: list[dict[str, Any]] = [{} for _ in configs]
  failed: dict[int, str] = {}
  for stage_index, (name, _, _) in enumerate(layouts[0]):
    live = [k for k in range(len(configs)) if k not in failed]
    opened: dict[int, train_lib.OpenStage] = {}
    held = contextlib.ExitStack()  # each point's stage folder while the stage runs, as `finetune train` holds it
    try:
      for k in live:
        _, stage_cfg, run_dir = layouts[k][stage_index]
        try:
          held.enter_context(train_lib.held_stage_folder(run_dir, workdirs[k], name))
          result = train_lib.open_stage(stage_cfg, run_dir, workdirs[k], name)
        except FinetuneError as e:  # (an unreadable checkpoint of one point): the others go on
          failed[k] = str(e)
          continue
        if isinstance(result, dict):
          summaries[k][name] = result
        else:
          opened[k] = result
      by_start = collections.defaultdict(list)
      for k, stage_run in opened.items():
        by_start[stage_run.start].append(k)
      for start, members in by_start.items():
        if len(members) == 1 or start == opened[members[0]].stage.total_steps:
          for k in members:  # alone: exactly `finetune train`'s loop
            stage_run = opened[k]
            try:
              outcome = train_lib.train_loop(stage_run.stage, stage_run.state, stage_run.start,
                                              stage_run.phase, stage_run.checkpoints, stage_run.log, name,
                                              stage_run.run_dir)
              summaries[k][name] = train_lib.finish_stage(stage_run, *outcome)
            except FinetuneError as e:  # like a point of the group: reported at the end, the others go on
              failed[k] = str(e)
          continue
        outcomes, errors = train_together([opened[k] for k in members], name)
        for k, outcome, error in zip(members, outcomes, errors):
          if error:
            failed[k] = error
            continue
          try:  # (a non-finite final evaluation fails this point only, as alone)
            summaries[k][name] = train_lib.finish_stage(opened[k], *outcome)
          except FinetuneError as e:
            failed[k] = str(e)
    finally:
      for stage_run in opened.values():
        stage_run.close()
      held.close()
  for k, workdir in enumerate(workdirs):
    if k not in failed:
      write_json(os.path.join(workdir, "results.json"), summaries[k])
  if failed:
    raise FinetuneError("; ".join(f"{workdirs[k]}: {error}" for k, error in failed.items()) +
                        (f" (the other {len(configs) - len(failed)} points finished)" if len(failed) < len(configs)
                         else ""))
  return summaries


def stacked(sharding: NamedSharding) -> NamedSharding:
  """The sharding of the same array with a leading point axis (not split: each device holds every point's part)."""
  return NamedSharding(sharding.mesh, P(None, *sharding.spec))


def unroll_points(model: nnx.Module) -> bool:
  """Whether `train_together` maps the step over points with a loop inside the program instead of `jax.vmap`: on
  XLA:CPU for models with convolutions. vmap over per-point kernels makes every convolution one grouped
  convolution (feature_group_count = points), which XLA:CPU runs off its fast path: the MNIST CNN's step took
  5,503 ms for 2 points vmapped, 676 ms unrolled, against 353 ms for one (benchmarks/vmap_sweep.py --step-only).
  Elsewhere (accelerators, dense models) vmap's batched matmuls are the point of training together."""
  return jax.default_backend() == "cpu" and any(isinstance(node, nnx.Conv) for _, node in nnx.iter_graph(model))


def point_map(fn, count: int, unroll: bool):
  """`fn` mapped over the leading (point) axis of every argument and result: `jax.vmap(fn)`, or with `unroll` a
  Python loop over the `count` points traced into the same program (each point's ops exactly as in its solo step;
  XLA may still overlap the independent points). Same results either way, up to float rounding."""
  if not unroll:
    return jax.vmap(fn)

  def unrolled(*args):
    outs = [fn(*jax.tree.map(lambda leaf, k=k: leaf[k], args)) for k in range(count)]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outs)
  return unrolled


def train_together(runs: Sequence[train_lib.OpenStage], name: str) -> tuple[list[Any], list[str]]:
  """The loop of `train.train_loop` for several runs of one stage at once (same start step). Returns, per run,
  (state, train seconds, train steps, early-stopping report) or its error text ('' when it finished)."""
  runs = list(runs)
  errors = [""] * len(runs)
  active = list(range(len(runs)))
  reference = runs[0].stage
  total, start, phase = reference.total_steps, runs[0].start, runs[0].phase
  for run in runs:
    _check_same_shapes(reference, run.stage, phase)
  for run in runs[1:]:  # one evaluation program serves every point (same shapes, task and data): compiled once
    run.stage.adopt_eval_step(reference)
  first_rate = runs[0].cfg.optimizer.learning_rate
  # (equal rates scale by 1: they may be 0, or unused under optimizer.lr_range)
  scales_all = np.asarray([1.0 if run.cfg.optimizer.learning_rate == first_rate
                           else run.cfg.optimizer.learning_rate / first_rate for run in runs], np.float32)
  for run, scale in zip(runs, scales_all):
    _check_scaled_rates(reference, run.stage, float(scale))
  unroll = unroll_points(reference.abstract_model)
  if unroll:
    print(f"[{name}] XLA:CPU and convolutions: the {len(runs)} points' steps run one after another inside one "
          "program (vmap would turn each convolution into a far slower grouped one)", flush=True)
  mesh = reference.mesh
  batch_spec = stacked(batch_sharding(mesh))
  compiled: dict[tuple[int, int], Any] = {}

  def step_program(phase: int, count: int):
    """The vmapped train step of `phase` for `count` points, compiled ahead of time (one per phase and count)."""
    if (phase, count) not in compiled:
      shardings = jax.tree.map(stacked, reference.state_shardings(phase))
      abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct((count, *leaf.shape), leaf.dtype,
                                                                sharding=stacked(leaf.sharding)),
                              reference.abstract_state(phase))
      batch = {key: jax.ShapeDtypeStruct((count, value.shape[0] * jax.process_count(), *value.shape[1:]),
                                         value.dtype, sharding=batch_spec)
               for key, value in reference.pipeline.train_batch(0).items()}

      def point_step(state: TrainState, batch: dict, lr_scale: jax.Array):
        return reference.step_fn(phase, lr_scale)(state, batch)

      program = jax.jit(point_map(point_step, count, unroll), in_shardings=(shardings, batch_spec, replicated(mesh)),
                        out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
      scales = jax.ShapeDtypeStruct((count,), jnp.float32, sharding=replicated(mesh))
      compiled[(phase, count)] = program.lower(abstract, batch, scales).compile()
    return compiled[(phase, count)]

  # Memory: the stacked state is the only copy kept. A point's own state or weights are sliced out of it when
  # needed (an evaluation, a checkpoint, a phase change, the end) and dropped after use, so K points hold about K
  # solo states, not three copies each (checkpoint writes: see `writing` below).
  def stack(point_states: list[TrainState]) -> TrainState:
    shardings = jax.tree.map(stacked, reference.state_shardings(phase))
    return jax.device_put(jax.tree.map(lambda *leaves: jnp.stack(leaves), *point_states), shardings)

  def point_state(together: TrainState, position: int, k: int) -> TrainState:
    return jax.device_put(jax.tree.map(lambda leaf: leaf[position], together), runs[k].stage.state_shardings(phase))

  def point_weights(together: TrainState, position: int, k: int) -> dict[str, Any]:
    """What an evaluation reads (no optimizer state)."""
    weights = train_lib.weights_of(together)
    shardings = {"params": runs[k].stage.params_sharding, "model_state": runs[k].stage.model_state_sharding}
    return jax.device_put(jax.tree.map(lambda leaf: leaf[position], weights), shardings)

  together = stack([run.state for run in runs])
  for run in runs:
    run.state = None  # (the stacked copy replaces it)
  program = step_program(phase, len(active))
  scales = jax.device_put(scales_all[active], replicated(mesh))
  pending: list[dict[str, jax.Array]] = []
  # One point's checkpoint write in flight at a time: until orbax has written it, it holds the point's sliced state
  # and a copy of its own (2 solo states), so K points written at once held 3K states instead of K + 2.
  writing: int | None = None
  progress = Progress(total, start, f"{name} ({len(runs)} points)")
  # Earlier attempts' training time up to `start`, as train_loop reads it (the points resume together, from the
  # same step; a resumed group's throughput covered its last attempt only, and timing.json was never written).
  earlier = train_lib.timing_before(runs[active[0]].run_dir, start)
  timer, train_seconds, train_steps = train_lib.IntervalTimer(), float(earlier["seconds"]), int(earlier["steps"])
  try:
    for step in range(start, total):
      step_phase = reference.strategy.phase_index(step)
      if step_phase != phase:  # an unfreezing boundary: each point enters the phase as it would alone
        timer.pause(pending)
        point_states = [runs[k].stage.enter_phase(point_state(together, position, k), step_phase)
                        for position, k in enumerate(active)]
        together, phase = None, step_phase
        together, program = stack(point_states), step_program(phase, len(active))
        del point_states
        timer.resume()
      # (points, per-process batch, ...): each point's own batch of this step
      batch = _point_batches(runs, active, step)
      together, metrics = program(together, to_global(batch, batch_spec), scales)
      pending.append(metrics)
      train_lib.pace(pending)
      done = step + 1
      save_now = any(runs[k].cfg.train.checkpoint_every and done % runs[k].cfg.train.checkpoint_every == 0
                     for k in active)
      log_now = done % reference.cfg.train.log_every == 0 or done == total or save_now
      if log_now:
        host = jax.device_get(pending)
        seconds = timer.lap()
        train_seconds += seconds
        train_steps += len(host)
        examples_per_s = len(host) * reference.pipeline.batch_size / max(seconds, 1e-9)
        unfinished = []
        for position, k in enumerate(active):
          own = [{key: value[position] for key, value in m.items()} for m in host]
          try:
            train_lib.check_finite(own, done, runs[k].checkpoints, runs[k].cfg.optimizer)
          except FinetuneError as e:
            errors[k] = str(e)
            continue
          averaged = train_lib.log_interval(runs[k].log, done, own, examples_per_s,
                                            train_lib.top_label(runs[k].stage.strategy, phase))
          unfinished.append((position, k, averaged))
        progress.update(len(host), {"loss": float(np.mean([a["loss"] for _, _, a in unfinished] or [np.nan])),
                                    "points": len(unfinished)})
        pending = []
        if any([runs[k].checkpoints.sum_finished_saves() for _, k, _ in unfinished]):  # (every point's)
          timer.resume()  # (as train_loop: reading checkpoints back is not training time)
      # As train_loop: evaluations before the checkpoint of the same step, so a resume replays them, and a
      # non-finite one fails its point before its diverged weights are saved.
      eval_every = reference.cfg.train.eval_every
      if eval_every and done % eval_every == 0 and done != total:
        timer.pause(pending)
        for position, k in enumerate(active):
          if errors[k]:  # diverged at this step: it stops below
            continue
          stage, weights = runs[k].stage, point_weights(together, position, k)
          results = {split: train_lib.evaluate(stage.eval_step(), weights, stage.pipeline, split, stage.mesh)
                     for split in stage.pipeline.eval_splits}
          del weights
          for split, metrics in results.items():
            runs[k].log.write(done, split, metrics)
          try:
            train_lib.check_finite_evaluation(results, done, runs[k].cfg.optimizer, runs[k].run_dir)
          except FinetuneError as e:
            errors[k] = str(e)
        timer.resume()
      survivors = [k for k in active if not errors[k]]
      if len(survivors) != len(active) or save_now or done == total:
        timer.pause(pending)
        for position, k in enumerate(active):
          if not errors[k] and (done == total or (runs[k].cfg.train.checkpoint_every and
                                                  done % runs[k].cfg.train.checkpoint_every == 0)):
            if writing is not None:
              runs[writing].checkpoints.wait()
            runs[k].checkpoints.save(done, point_state(together, position, k).as_dict())
            writing = k
            train_lib.record_timing(runs[k].run_dir, done, train_seconds, train_steps)
        if len(survivors) != len(active):  # a point failed: the others go on without it
          # Steps not logged yet (a failed evaluation between log lines) keep only the survivors' rows: read by
          # position at the next log, they would otherwise give a survivor the failed point's metrics.
          keep = np.asarray([active.index(k) for k in survivors])
          pending = [{key: value[keep] for key, value in metrics.items()} for metrics in pending]
          active = survivors
          if not active:
            break
          shardings = jax.tree.map(stacked, reference.state_shardings(phase))
          together = jax.device_put(jax.tree.map(lambda leaf: leaf[keep], together), shardings)
          program = step_program(phase, len(active))
          scales = jax.device_put(scales_all[active], replicated(mesh))
        timer.resume()  # (checkpoints and a recompilation are not training time)
    finished = {k: point_state(together, position, k) for position, k in enumerate(active)}
  finally:
    progress.close()
  # (a failed point has no state: its error is reported instead)
  return [(finished.get(k), train_seconds, train_steps, {}) for k in range(len(runs))], errors


def _point_batches(runs: Sequence[train_lib.OpenStage], active: list[int], step: int) -> dict[str, np.ndarray]:
  """(points, per-process batch, ...) arrays: each active point's own training batch of `step`."""
  batches = [runs[k].stage.pipeline.train_batch(step) for k in active]
  return {key: np.stack([batch[key] for batch in batches]) for key in batches[0]}


def _check_same_shapes(reference: train_lib.Stage, other: train_lib.Stage, phase: int) -> None:
  """The configs matched; this guards the state itself (shapes, dtypes, tree structure, anchors included)."""
  describe = lambda stage: jax.tree.map(lambda leaf: (tuple(leaf.shape), str(leaf.dtype)),
                                        stage.abstract_state(phase))
  if jax.tree.structure(describe(reference)) != jax.tree.structure(describe(other)) or \
      jax.tree.leaves(describe(reference)) != jax.tree.leaves(describe(other)):
    raise FinetuneError(f"the point with seed {other.cfg.seed} has a train state of other shapes than the first "
                        "point's; run it alone (without --vmap)")


def _check_scaled_rates(reference: train_lib.Stage, other: train_lib.Stage, scale: float) -> None:
  """Every optimizer label's peak rate of `other` must be `scale` times the reference's (lr_scale is exact)."""
  mine, theirs = reference.strategy.labels(), other.strategy.labels()
  if list(mine) != list(theirs) or not all(np.isclose(theirs[label], scale * mine[label], rtol=1e-6)
                                           for label in mine):
    raise FinetuneError("points trained together must have per-label learning rates in one ratio; got "
                        f"{dict(theirs)} vs {scale} x {dict(mine)}")
