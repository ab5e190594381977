"""`finetune plan`: what a config's training step will cost on a mesh, before anything is allocated.

Each stage is built from abstract shapes (`nnx.eval_shape`; parameters never exist), its train step lowered and
compiled ahead of time for the configured mesh exactly as `finetune train` would run it, and the compiled program's
own accounting read back: per-device bytes of parameters and optimizer state (from their shardings), XLA's
`memory_analysis()` (arguments, temporaries: activations kept for the backward pass, gradients, workspace) and
`cost_analysis()` FLOPs per step and device (the partitioned program's: 1/N of the step's total on N devices;
taken from the step compiled without scanned layers and gradient accumulation, whose loop bodies XLA counts once).
With `--devices N` on a CPU machine, N fake host devices stand in for the target mesh; the byte figures for
parameters and optimizer state are exact for any backend, while temporaries and FLOPs are the CPU compiler's
(GPU/TPU compilers fuse and schedule differently; see docs/architecture.md).

As `finetune train` runs the stage: every unfreezing phase is compiled (figures are the peak over phases), a
cached-feature stage compiles the head on features, and a regularised stage carries its anchors.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from finetune import config as config_lib
from finetune import regularizers
from finetune.data.pipeline import with_rehearsal
from finetune.errors import FinetuneError
from finetune.partition import flatten


def _per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def plan_stage(cfg: ConfigDict, lineage: tuple[bool, ...] = (True,), continues_adapters: bool = False
               ) -> dict[str, Any]:
  """The stage's figures; with unfreezing phases, each figure is its peak over the phases (the last phase trains
  most, but a figure is reported as the worst any phase reaches), and `phases` lists every phase's.
  `lineage`: what the stage starts from, nearest first (True: a task of this framework, False: a Hugging Face
  checkpoint); offline EWC keeps one term per task. `continues_adapters`: the nearest is a run with this stage's
  PEFT settings, whose adapters the stage loads. `plan` reads both from the config's stages and runs on disk."""
  stage = _planned_stage(cfg, lineage, continues_adapters)
  phases = [_plan_phase(stage, phase) for phase in range(len(stage.strategy.phases))]
  twin = _loop_free_twin(cfg)
  if twin is not None:  # the step's FLOPs from the same step without its layer and micro-batch loops
    twin_stage = _planned_stage(twin, lineage, continues_adapters)
    for phase, figures in enumerate(phases):
      compiled = twin_stage.train_step(phase)
      figures["flops_per_step"], figures["flops_lower_bound"] = _flops(compiled)
  total = stage.peft_info.get("total_params", stage.strategy.counts(0)["params"])
  peak = {key: max(p[key] for p in phases) for key in phases[0]}
  return {
      "mesh": dict(stage.mesh.shape), "devices": stage.mesh.size, "params": total,
      "trainable_percent": 100.0 * peak["trainable"] / max(total, 1), "batch_size": cfg.data.batch_size,
      "regularizers": regularizers.active(cfg), **peak, "phases": phases,
  }


def _loop_free_twin(cfg: ConfigDict) -> ConfigDict | None:
  """The stage with its blocks unrolled and one micro-batch per step, or None where it has neither loop: XLA's
  cost analysis counts a loop's body once, not once per iteration, so a scanned model's FLOPs were those of one
  block (7x low for 8 layers) and accumulation's those of one micro-batch. Both change how the step is scheduled,
  not what it computes (rematerialisation, which does, is kept)."""
  if not cfg.train.scan_layers and cfg.train.grad_accum_steps == 1:
    return None
  twin = cfg.copy_and_resolve_references()
  twin.train.scan_layers, twin.train.grad_accum_steps = False, 1
  return twin


def _flops(compiled: Any) -> tuple[float, bool]:
  """(FLOPs per step and device, whether a loop with matrix products remains in the program, so that the count is a
  lower bound: the LSTM's recurrence over time is one loop body to XLA's cost analysis)."""
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))), _loop_with_matmuls(compiled.as_text())


# An HLO computation's header line ("%name (params) -> type {", or "ENTRY %name ..."), its calls, its matrix products
# (a dot or convolution, or a GPU library's GEMM custom call).
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_CALLED = re.compile(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)")
_MATMUL = re.compile(r" (?:dot|convolution)\(|custom_call_target=\"[^\"]*(?:gemm|matmul)", re.IGNORECASE)


def _loop_with_matmuls(hlo: str) -> bool:
  """Whether a while loop of the compiled program (its text) computes a matrix product in its body, itself or in a
  computation it calls: such a loop's FLOPs are a multiple of what cost analysis counts. The random-bit loops of
  dropout's generator are left out: their integer arithmetic is not what the figure is read for."""
  bodies, name = {}, None
  for line in hlo.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      name = header.group(1)
      bodies[name] = []
    elif name is not None:
      bodies[name].append(line)

  def has_matmul(computation: str, seen: set[str]) -> bool:
    if computation in seen or computation not in bodies:
      return False
    seen.add(computation)
    return any(_MATMUL.search(line) or any(has_matmul(called, seen) for called in _CALLED.findall(line))
               for line in bodies[computation])

  loop_bodies = [match for line in hlo.splitlines() if " while(" in line
                 for match in re.findall(r"body=%([\w.\-]+)", line)]
  return any(has_matmul(body, set()) for body in loop_bodies)


def _planned_stage(cfg: ConfigDict, lineage: tuple[bool, ...], continues_adapters: bool) -> Any:
  """The stage as `finetune train` would compile it (cached features, anchors, rehearsal batches)."""
  from finetune.methods import feature_cache  # pylint: disable=g-import-not-at-top
  from finetune.train import build_stage  # pylint: disable=g-import-not-at-top
  stage = build_stage(cfg)
  if cfg.features.cache:  # as run_stage: the head alone, on features of the backbone's width
    feature_cache.check_cacheable(stage.strategy, stage.pipeline, cfg.freeze.train_bn, stage.abstract_model)
    state = stage.abstract_state(0)
    pipeline = feature_cache.feature_shaped_pipeline(
        stage.graphdef, {"params": state.params, "model_state": state.model_state}, stage.pipeline)
    stage = dataclasses.replace(stage, pipeline=pipeline, forward=feature_cache.classify_features, _cache={})
  names = regularizers.active(cfg)
  if names:
    stage = dataclasses.replace(stage, anchors=_planned_anchors(stage, cfg, lineage, continues_adapters), _cache={})
  if "rehearsal" in names:  # its batches carry source_mask: the stage's own examples stand in for the source's
    stage = dataclasses.replace(stage, pipeline=with_rehearsal(stage.pipeline, stage.pipeline.train,
                                                               cfg.rehearsal.fraction, cfg.train.grad_accum_steps),
                                _cache={})
  return stage


def _planned_anchors(stage: Any, cfg: ConfigDict, lineage: tuple[bool, ...], continues_adapters: bool) -> Any:
  """The regularizers' anchors as shapes, for the earlier tasks and checkpoints of `lineage`, assumed to have this
  stage's parameter shapes (their weights and Fisher information): plan runs before their checkpoints need exist.
  The anchors' bytes and the penalty's work are then those of the run, or an upper bound where an older task's head
  has another shape (its head is then not anchored). What the run would refuse (EWC after a Hugging Face
  checkpoint, a regularizer with nothing before it) raises the run's error."""
  from finetune import adapters  # pylint: disable=g-import-not-at-top
  from finetune.train import check_regularizers_act, reinitialised_paths  # pylint: disable=g-import-not-at-top
  state = stage.abstract_state(0)
  # As the lineage folds: a continued run's adapters stay its own unless the penalty folds the stage's (effective).
  folds = adapters.effective_weights(stage.abstract_model, cfg.peft) is not None

  def anchors(params: Any, model_state: Any) -> dict[str, Any]:
    flat, flat_state = flatten(stage.layout.view(params)), flatten(stage.layout.view(model_state))
    sources = [regularizers.Source(f"(planned earlier task {i + 1})" if task else "(a Hugging Face checkpoint)", "",
                                   cfg if task else None, flat, flat_state) for i, task in enumerate(lineage)]
    context = regularizers.Context(
        cfg=cfg, shapes={p: tuple(v.shape) for p, v in flat.items()},
        reinitialised=reinitialised_paths(stage, cfg, flat, flat if continues_adapters and not folds else ()),
        sources=sources, fisher=lambda source: source.params, start=flat, start_state=flat_state,
        peft_added=frozenset(p for p in flat if p not in stage.base_paths))
    check_regularizers_act(stage, context)
    return {name: regularizers.REGULARIZERS.get(name).anchors(context) for name in regularizers.active(cfg)}

  shapes = jax.eval_shape(anchors, state.params, state.model_state)
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(
      leaf.shape, jnp.float32 if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype), shapes)


def _plan_phase(stage: Any, phase: int) -> dict[str, Any]:
  state = stage.abstract_state(phase)
  compiled = stage.train_step(phase)
  memory = compiled.memory_analysis()
  flops, lower_bound = _flops(compiled)
  return {
      "trainable": stage.strategy.counts(phase)["trainable"],
      "param_bytes_per_device": _per_device_bytes(state.params) + _per_device_bytes(state.model_state),
      "optimizer_bytes_per_device": _per_device_bytes(state.opt_state),
      "argument_bytes": int(memory.argument_size_in_bytes), "temporary_bytes": int(memory.temp_size_in_bytes),
      "output_bytes": int(memory.output_size_in_bytes), "alias_bytes": int(memory.alias_size_in_bytes),
      "flops_per_step": flops,  # per device: the partitioned program's
      "flops_lower_bound": lower_bound,
  }


def plan(config: ConfigDict) -> dict[str, dict[str, Any]]:
  """{stage: plan} for every stage of a loaded config."""
  stages = dict(config_lib.stage_configs(config))
  return {name: plan_stage(stage_cfg, _lineage(stage_cfg, stages), _continues_adapters(stage_cfg, stages))
          for name, stage_cfg in stages.items()}


def _continues_adapters(cfg: ConfigDict, stages: dict[str, ConfigDict]) -> bool:
  """Whether the stage starts from a run with its own PEFT settings (it loads its adapters): a stage of this config,
  or a run directory of this framework that exists already (its config.json)."""
  from finetune import adapters  # pylint: disable=g-import-not-at-top
  if not cfg.peft.method or not cfg.init_from:
    return False
  source = next(iter(_earlier_configs(cfg, stages)), None)
  return source is not None and source[1] is not None and adapters.same_adapters(source[1].peft, cfg.peft)


def _lineage(cfg: ConfigDict, stages: dict[str, ConfigDict]) -> tuple[bool, ...]:
  """What `regularizers.lineage` will find before a stage, nearest first (True: a task of this framework, False: a
  Hugging Face checkpoint): its `init_from` chain through this config's stages, then through the config.json of
  runs that exist already (a run not trained yet counts as one task)."""
  return tuple(task for task, _ in _earlier_configs(cfg, stages))


def _earlier_configs(cfg: ConfigDict, stages: dict[str, ConfigDict]):
  """(is a task of this framework, its config or None when unknown), nearest first, along `init_from`: this
  config's stages, then the run directories on disk as `regularizers.lineage` follows them, reading no arrays."""
  from finetune.checkpoint import resolve_checkpoint  # pylint: disable=g-import-not-at-top
  from finetune.models import hf  # pylint: disable=g-import-not-at-top
  from finetune.reporting import read_json  # pylint: disable=g-import-not-at-top
  workdir, seen = None, set()  # workdir: None while in this config's own stages
  while cfg is not None and cfg.get("init_from"):
    spec = cfg.init_from
    if spec.startswith("stage:") and workdir is None:
      cfg = stages[spec[len("stage:"):]]
      yield True, cfg
      continue
    try:
      step_dir = resolve_checkpoint(spec, workdir or os.getcwd())
    except FinetuneError:  # not trained yet: one task of this framework, its own sources unknown
      yield not hf.is_hf_checkpoint(os.path.expanduser(spec)), None
      return
    if hf.is_hf_checkpoint(step_dir):
      yield False, None
      return
    run_dir = os.path.dirname(os.path.dirname(step_dir))  # <run>/checkpoints/<step>
    config_path = os.path.join(run_dir, "config.json")
    if step_dir in seen:
      return
    seen.add(step_dir)
    cfg = ConfigDict(read_json(config_path)) if os.path.isfile(config_path) else None
    yield True, cfg
    workdir = os.path.dirname(run_dir)  # a source's `stage:NAME` is a folder of its own workdir


def table(plans: dict[str, dict[str, Any]]) -> str:
  """One row per stage; a stage with unfreezing phases shows each figure's peak over them."""
  gib = 2 ** 30
  rows = [("stage", "mesh", "params", "trainable", "params/dev GiB", "opt/dev GiB", "args GiB", "temps GiB",
           "TFLOP/dev/step")]
  for name, p in plans.items():
    mesh = ",".join(f"{k}={v}" for k, v in p["mesh"].items() if v > 1) or "1 device"
    label = name + "".join(f" +{r}" for r in p.get("regularizers", ())) + (
        f" (peak of {len(p['phases'])} phases)" if len(p.get("phases", ())) > 1 else "")
    rows.append((label, mesh, f"{p['params']:,}", f"{p['trainable']:,} ({p['trainable_percent']:.2f}%)",
                 _figure(p["param_bytes_per_device"] / gib), _figure(p["optimizer_bytes_per_device"] / gib),
                 _figure(p["argument_bytes"] / gib), _figure(p["temporary_bytes"] / gib),
                 (">=" if p.get("flops_lower_bound") else "") + _figure(p["flops_per_step"] / 1e12)))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _figure(value: float) -> str:
  """Three decimals, or two significant digits for a small model's figures that would all read 0.000."""
  return f"{value:.3f}" if value == 0 or abs(value) >= 1e-3 or value != value else f"{value:.1e}"
