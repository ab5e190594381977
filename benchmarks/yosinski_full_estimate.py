"""The Yosinski full grid's training time on this device, from a shortened `scale=full` run's stage rates.

    python benchmarks/yosinski_full_estimate.py WORKDIR

WORKDIR is a `finetune train --config configs/cifar10_yosinski.py:scale=full,ns=1+5,...` run (benchmarks/
device_kit.sh makes one). The full grid is 18 points x (2 base + 4 conditions x N=5 transfer networks) x 4,000
steps of 128. n = 2..4 are not run, so each condition's step time there is the mean of its n = 1 and n = 5
(frozen groups get no gradient computation, so the step time falls as n grows). Prints the per-stage rates and
the estimate; compilation, evaluation and process start-up are not in it. Asserts nothing.
"""

from __future__ import annotations

import json
import os
import sys

BATCH, STEPS, POINTS, N = 128, 4000, 18, 5


def main(workdir: str) -> None:
  rates = {}
  for name in sorted(os.listdir(workdir)):
    summary = os.path.join(workdir, name, "summary.json")
    if os.path.isfile(summary):
      with open(summary) as file:
        rates[name] = json.load(file)["train_examples_per_s"]
  step_s = {name: BATCH / rate for name, rate in rates.items()}
  for name, rate in rates.items():
    print(f"{name:12s} {rate:10,.0f} train examples/s  {1000 * step_s[name]:8.2f} ms/step")
  missing = [name for name in ("baseA", "baseB", *(f"{c}_{n}" for c in ("BnB", "BnB_plus", "AnB", "AnB_plus")
                                                    for n in (1, N))) if name not in step_s]
  if missing:
    raise SystemExit(f"{workdir} has no summary.json for {', '.join(missing)}; run the config with ns=1+{N}")
  per_point = STEPS * (step_s["baseA"] + step_s["baseB"])
  for condition in ("BnB", "BnB_plus", "AnB", "AnB_plus"):
    first, last = step_s[f"{condition}_1"], step_s[f"{condition}_{N}"]
    per_point += STEPS * (first + last + (N - 2) * (first + last) / 2)
  print(f"full grid ({POINTS} points): about {POINTS * per_point / 3600:.1f} h of training steps on this device, "
        "before compilation, evaluation and process start-up")


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit(__doc__.split("\n\n")[1].strip())
  main(sys.argv[1])
