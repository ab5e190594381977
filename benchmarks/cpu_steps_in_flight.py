"""Why the training loops bound the steps in flight (finetune.train.MAX_STEPS_IN_FLIGHT): XLA's CPU client hangs
when many multi-device programs are queued unfinished on host devices.

    python benchmarks/cpu_steps_in_flight.py [--steps 600] [--timeout 150]

Each case runs in a fresh process with 8 host devices: a small data=2 x fsdp=4 sharded step (a matmul, its
gradient, an update) dispatched `--steps` times, either never waiting (the loss is read at the end) or waiting on
the step `bound` back, as the loops do. Prints one line per case: finished (seconds) or hung (killed at
--timeout, or XLA's own abort of a collective that some device never joined).
On the 2-core development machine (2026-12-03), idle: never waiting, 600 steps hung (XLA aborted after 62 s) and
50 finished; waiting 2, 4 or 8 back, 600 steps finished in 2.7-3.1 s. With CI's tests running beside it, 50 steps
never waiting hung too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

CASE = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
steps, bound = int(sys.argv[1]), int(sys.argv[2])
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
weights = jax.device_put(jnp.ones((256, 256)), NamedSharding(mesh, P("fsdp", None)))
inputs = jax.device_put(jnp.ones((64, 256)), NamedSharding(mesh, P(("data", "fsdp"), None)))

@jax.jit
def step(weights, inputs):
  loss, grad = jax.value_and_grad(lambda w: jnp.mean(jnp.tanh(inputs @ w) ** 2))(weights)
  return weights - 0.01 * grad, loss

losses = []
for _ in range(steps):
  weights, loss = step(weights, inputs)
  losses.append(loss)
  if bound and len(losses) > bound:
    losses[-bound - 1].block_until_ready()
print(float(losses[-1]))
"""


def run_case(steps: int, bound: int, timeout: float) -> str:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  start = time.perf_counter()
  try:
    result = subprocess.run([sys.executable, "-c", CASE, str(steps), str(bound)], env=env, capture_output=True,
                            text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return f"hung (killed after {timeout:.0f} s)"
  seconds = time.perf_counter() - start
  if result.returncode == 0:
    return f"finished in {seconds:.1f} s"
  aborted = "Termination timeout" in result.stderr
  return f"hung ({'XLA aborted a collective' if aborted else 'exit ' + str(result.returncode)} after {seconds:.0f} s)"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--timeout", type=float, default=150.0)
  args = parser.parse_args()
  for bound in (0, 2, 4, 8):  # 4: finetune.train.MAX_STEPS_IN_FLIGHT
    label = "never waiting" if not bound else f"waiting on the step {bound} back"
    print(f"{args.steps} steps, {label}: {run_case(args.steps, bound, args.timeout)}", flush=True)


if __name__ == "__main__":
  main()
