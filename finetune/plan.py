"""`finetune plan`: what a config's training step will cost on a mesh, before anything is allocated.

Each stage is built from abstract shapes (`nnx.eval_shape`; parameters never exist), its train step lowered and
compiled ahead of time for the configured mesh exactly as `finetune train` would run it, and the compiled program's
own accounting read back: per-device bytes of parameters and optimizer state (from their shardings), XLA's
`memory_analysis()` (arguments, temporaries: activations kept for the backward pass, gradients, workspace) and
`cost_analysis()` FLOPs per step and device (the partitioned program's: 1/N of the step's total on N devices).
With `--devices N` on a CPU machine, N fake host devices stand in for the target mesh; the byte figures for
parameters and optimizer state are exact for any backend, while temporaries and FLOPs are the CPU compiler's
(GPU/TPU compilers fuse and schedule differently; see docs/architecture.md).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from finetune import config as config_lib


def _per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def plan_stage(cfg: ConfigDict) -> dict[str, Any]:
  from finetune.train import build_stage  # pylint: disable=g-import-not-at-top
  stage = build_stage(cfg)
  state = stage.abstract_state(0)
  compiled = stage.train_step(0)
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  counts = stage.strategy.counts(0)
  total = stage.peft_info.get("total_params", counts["params"])
  trainable = counts["trainable"]
  return {
      "mesh": dict(stage.mesh.shape), "devices": stage.mesh.size,
      "params": total, "trainable": trainable, "trainable_percent": 100.0 * trainable / max(total, 1),
      "batch_size": cfg.data.batch_size,
      "param_bytes_per_device": _per_device_bytes(state.params) + _per_device_bytes(state.model_state),
      "optimizer_bytes_per_device": _per_device_bytes(state.opt_state),
      "argument_bytes": int(memory.argument_size_in_bytes), "temporary_bytes": int(memory.temp_size_in_bytes),
      "output_bytes": int(memory.output_size_in_bytes), "alias_bytes": int(memory.alias_size_in_bytes),
      "flops_per_step": float(cost.get("flops", float("nan"))),  # per device: the partitioned program's
  }


def plan(config: ConfigDict) -> dict[str, dict[str, Any]]:
  """{stage: plan} for every stage of a loaded config."""
  return {name: plan_stage(stage_cfg) for name, stage_cfg in config_lib.stage_configs(config)}


def table(plans: dict[str, dict[str, Any]]) -> str:
  gib = 2 ** 30
  rows = [("stage", "mesh", "params", "trainable", "params/dev GiB", "opt/dev GiB", "args GiB", "temps GiB",
           "TFLOP/dev/step")]
  for name, p in plans.items():
    mesh = ",".join(f"{k}={v}" for k, v in p["mesh"].items() if v > 1) or "1 device"
    rows.append((name, mesh, f"{p['params']:,}", f"{p['trainable']:,} ({p['trainable_percent']:.2f}%)",
                 f"{p['param_bytes_per_device'] / gib:.3f}", f"{p['optimizer_bytes_per_device'] / gib:.3f}",
                 f"{p['argument_bytes'] / gib:.3f}", f"{p['temporary_bytes'] / gib:.3f}",
                 f"{p['flops_per_step'] / 1e12:.3f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
