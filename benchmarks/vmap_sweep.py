"""K sweep points trained together (one vmapped program, finetune/vmap.py) vs one after another.

    python benchmarks/vmap_sweep.py [--config configs/mnist_forgetting.py:variant=finetune] [--points 4]
                                    [--config.key=value ...]

The K points are the config with seeds 0..K-1, and learning rates alternating x1 / x0.5 (so the per-point
learning-rate scale is exercised too). "one after another" runs `train.train_and_evaluate` for each point in this
process (no process start-up, which a `finetune sweep` would add per point); "together" runs
`vmap.train_points` on the same K configs. Both write fresh temporary workdirs. Prints wall seconds (everything:
data, compile, training, evaluation, checkpoints), training-loop examples/s summed over the points, the ratio, and
the largest difference in final test/validation accuracy between a point's two runs. Asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from finetune import train as train_lib
from finetune import vmap
from finetune.cli import split_overrides
from finetune.config import load_config


def point_configs(spec: str, count: int, overrides: list[str]):
  base_lr = load_config(spec, overrides).optimizer.learning_rate
  return [load_config(spec, [*overrides, f"seed={k}", f"optimizer.learning_rate={base_lr * (1.0 if k % 2 == 0 else 0.5)}"])
          for k in range(count)]


def loop_throughput(summaries: list[dict]) -> float:
  """Training examples/s summed over the points, for the last stage (each point's own examples over its loop's
  wall time; points trained together share that time, so the sum is the group's throughput)."""
  return sum(list(s.values())[-1]["train_examples_per_s"] for s in summaries)


def final_accuracies(summaries: list[dict]) -> list[float]:
  out = []
  for stages in summaries:
    last = list(stages.values())[-1]["final"]
    out.append(last["test"]["accuracy"] if "test" in last else next(iter(last.values()))["accuracy"])
  return out


def main() -> None:
  rest, overrides = split_overrides(__import__("sys").argv[1:])
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/mnist_forgetting.py:variant=finetune")
  parser.add_argument("--points", type=int, default=4)
  args = parser.parse_args(rest)
  configs = point_configs(args.config, args.points, overrides)
  root = tempfile.mkdtemp(prefix="vmap_bench_")

  started = time.perf_counter()
  alone = [train_lib.train_and_evaluate(cfg, f"{root}/alone/{k}") for k, cfg in enumerate(configs)]
  alone_seconds = time.perf_counter() - started

  started = time.perf_counter()
  together = vmap.train_points(configs, [f"{root}/together/{k}" for k in range(len(configs))])
  together_seconds = time.perf_counter() - started

  alone_rate, together_rate = loop_throughput(alone), loop_throughput(together)
  gap = max(abs(a - b) for a, b in zip(final_accuracies(alone), final_accuracies(together)))
  print(f"\n{args.points} points of {args.config} {' '.join('--config.' + o for o in overrides)}")
  print("| mode | wall s (all stages) | training examples/s (last stage, all points) |")
  print("|---|---|---|")
  print(f"| one after another | {alone_seconds:.1f} | {alone_rate:,.0f} |")
  print(f"| together (vmap) | {together_seconds:.1f} | {together_rate:,.0f} |")
  print(f"| ratio | {alone_seconds / together_seconds:.2f}x faster | {together_rate / alone_rate:.2f}x |")
  print(f"largest final-accuracy difference between a point's two runs: {gap:.4f}")


if __name__ == "__main__":
  main()
