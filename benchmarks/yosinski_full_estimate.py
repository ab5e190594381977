"""The Yosinski full grid's training time on this device, from a shortened `scale=full` run's stage rates.

    python benchmarks/yosinski_full_estimate.py WORKDIR

WORKDIR is a `finetune train --config configs/cifar10_yosinski.py:scale=full,ns=1+5,...` run (benchmarks/
device_kit.sh makes one). The grid itself (its points, each point's stages, their step counts and batch sizes)
is read from the config file's `scale=full` sweep, so this follows the config. A stage's step time is its batch
size / its measured training examples/s; stages that were not run (n = 2..4) get step times interpolated linearly
in n between the same condition's nearest measured n (frozen groups get no gradient computation, so step time
falls as n grows). That is an upper bound rather than a fit: step time follows the FLOPs of the groups still
training, most of which sit in the lowest, largest-resolution groups, so it falls faster than linearly. On the
reduced CNN's CPU step times (experiments/yosinski/README.md, n = 1..4: 0.112, 0.056, 0.0175, 0.0136 s) linear
interpolation from n = 1 and 4 gives 0.079 and 0.046 s for n = 2, 3, and a point's steps 6% too long; run the
config with every n (the default `ns`) for a measured figure. Prints the per-stage rates and the estimate;
compilation, evaluation and process start-up are not in it. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re

from finetune.config import stage_configs
from finetune.sweep import load_sweep

FULL_GRID = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                         "cifar10_yosinski.py") + ":scale=full"


def measured_rates(workdir: str) -> dict[str, float]:
  """{stage: training examples/s} from each stage's summary.json."""
  rates = {}
  for name in sorted(os.listdir(workdir)):
    summary = os.path.join(workdir, name, "summary.json")
    if os.path.isfile(summary):
      with open(summary) as file:
        rates[name] = json.load(file)["train_examples_per_s"]
  return rates


def stage_rate(name: str, rates: dict[str, float], workdir: str) -> float:
  """The measured rate, or for `<condition>_<n>` one interpolated in n between measured neighbours."""
  if name in rates:
    return rates[name]
  match = re.fullmatch(r"(.+)_(\d+)", name)
  if match is None:  # a base network (baseA, baseB): nothing to interpolate it from
    raise SystemExit(f"{workdir}: stage {name} was not run (no {name}/summary.json); run the whole config, "
                     "whose first stages are the base networks")
  measured = {int(other.rpartition("_")[2]): rate for other, rate in rates.items()
              if re.fullmatch(re.escape(match[1]) + r"_\d+", other)}
  n = int(match[2])
  below, above = [m for m in measured if m < n], [m for m in measured if m > n]
  if not below or not above:
    raise SystemExit(f"{workdir}: stage {name} was not run, and no smaller and larger n of it were to interpolate "
                     "from; run the config with ns=1+5 (the smallest and largest n)")
  low, high = max(below), min(above)
  # Step times, not rates, are interpolated (an upper bound for the middle n: see the module docstring).
  step_low, step_high = 1 / measured[low], 1 / measured[high]
  return 1 / (step_low + (step_high - step_low) * (n - low) / (high - low))


def main(workdir: str, grid: str = FULL_GRID) -> None:
  rates = measured_rates(workdir)
  points = load_sweep(grid)
  total_s = 0.0
  for point in points:
    for name, stage in stage_configs(point.config):
      total_s += stage.train.steps * stage.data.batch_size / stage_rate(name, rates, workdir)
  for name, rate in rates.items():
    print(f"{name:12s} {rate:10,.0f} train examples/s")
  print(f"full grid ({len(points)} points): about {total_s / 3600:.1f} h of training steps on this device, "
        "before compilation, evaluation and process start-up")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], usage=__doc__.split("\n\n")[1].strip())
  parser.add_argument("workdir", help="a shortened `scale=full` run's workdir")
  args = parser.parse_args()
  if not os.path.isdir(args.workdir):
    parser.error(f"{args.workdir} is not a folder")
  main(args.workdir)
