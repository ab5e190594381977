"""Step time of fine-tuning strategies, and cached vs uncached feature extraction. Prints a table.

    python benchmarks/strategies.py [--steps 20] [--data digits|mnist|cifar10]

Rows: full fine-tuning; frozen backbone (only the head trains: no backward pass through the backbone); frozen first
half of the layer groups; and, per epoch, a linear probe through the frozen backbone vs the same probe on cached
features (the backbone runs once, before the first epoch, and is not counted per epoch).
Same model, batch and data in every row; compilation is excluded (steps are compiled ahead of time).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax

from finetune import train as train_lib
from finetune.config import build_config
from finetune.data.pipeline import to_global
from finetune.methods import feature_cache
from finetune.sharding import batch_sharding

DATA = {
    "digits": {"name": "digits", "validation_fraction": 0.1},
    "mnist": {"name": "mnist"},
    "cifar10": {"name": "cifar10", "path": "../shared/data/cifar10"},
}
MODEL = {"name": "cnn", "stem_width": 32, "widths": (64, 128, 256), "blocks_per_stage": 2}


def _config(data: str, **sections):
  in_channels = 3 if data == "cifar10" else 1
  raw = {"model": {**MODEL, "in_channels": in_channels},
         "data": {**DATA[data], "batch_size": 128, "eval_batch_size": 500, "eval_splits": ("validation",)},
         "train": {"steps": 1000}}
  raw.update(sections)
  return build_config(raw)


def _seconds_per_step(stage, state, steps: int):
  """(seconds per step, the state after): the step donates its input state, so callers continue from the result."""
  train_fn = stage.train_step(0)
  spec = batch_sharding(stage.mesh)
  batches = [to_global(stage.pipeline.train_batch(i), spec) for i in range(steps + 2)]
  for batch in batches[:2]:  # warm up (allocation, caches)
    state, metrics = train_fn(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for batch in batches[2:]:
    state, metrics = train_fn(state, batch)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / steps, state


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--data", choices=sorted(DATA), default="digits")
  args = parser.parse_args()
  if args.steps < 1:
    parser.error(f"--steps {args.steps}: time at least 1 step")

  probe = {"patterns": ("^(?!head/)",)}
  variants = [
      ("full fine-tuning", {}),
      ("frozen backbone (head only)", {"freeze": probe}),
      ("frozen first 2 layer groups", {"freeze": {"first_n": 2}}),
  ]
  rows = []
  for name, sections in variants:
    config = _config(args.data, **sections)
    stage = train_lib.build_stage(config)
    state, _ = train_lib.initial_state(stage, config, "/tmp")
    counts = stage.strategy.counts(0)
    seconds, _ = _seconds_per_step(stage, state, args.steps)
    rows.append((name, seconds, counts["trainable"]))

  # Linear probe per epoch: uncached (backbone forward every step) vs cached features.
  config = _config(args.data, freeze=probe)
  stage = train_lib.build_stage(config)
  state, _ = train_lib.initial_state(stage, config, "/tmp")
  steps_per_epoch = stage.pipeline.steps_per_epoch
  seconds, state = _seconds_per_step(stage, state, args.steps)
  uncached = seconds * steps_per_epoch
  start = time.perf_counter()
  pipeline = feature_cache.cached_pipeline(stage.graphdef, {"params": state.params, "model_state": state.model_state},
                                           stage.pipeline, stage.mesh, "/tmp/finetune-bench", 4096)
  extraction = time.perf_counter() - start
  cached_stage = dataclasses.replace(stage, pipeline=pipeline, forward=feature_cache.classify_features, _cache={})
  seconds, _ = _seconds_per_step(cached_stage, state, max(args.steps, steps_per_epoch))
  cached = seconds * steps_per_epoch

  full = rows[0][1]
  print(f"data={args.data} model=cnn{MODEL['widths']} x{MODEL['blocks_per_stage']} batch=128 "
        f"devices={jax.device_count()} ({jax.devices()[0].platform})")
  print(f"{'variant':<32} {'ms/step':>9} {'vs full':>8} {'trainable params':>17}")
  for name, seconds, trainable in rows:
    print(f"{name:<32} {seconds * 1e3:>9.2f} {seconds / full:>7.2f}x {trainable:>17,}")
  print()
  print(f"linear probe, {steps_per_epoch} steps per epoch:")
  print(f"  uncached (backbone every step)  {uncached:8.3f} s/epoch")
  print(f"  cached features                 {cached:8.4f} s/epoch  ({uncached / cached:,.0f}x faster; one-off "
        f"extraction {extraction:.2f} s)")


if __name__ == "__main__":
  main()
