"""Why `finetune` sizes XLA's CPU client thread pool for fake host devices (finetune/host_devices.py), and why the
training loops also bound the steps in flight (finetune.train.MAX_STEPS_IN_FLIGHT).

    python benchmarks/cpu_host_device_threads.py [--programs 200] [--steps 600] [--timeout 120]

Each case runs in a fresh process with 8 host devices and prints one line: finished (seconds) or hung (XLA's own
abort of a collective that some device never joined, or killed at --timeout). Two workloads, each with the client's
default pool (max(cores, devices) threads: 8 on a 2-core machine) and with 2 x devices threads, the setting
`host_devices` makes:
* `burst`: one slow sharded program, then `--programs` cheap ones with an all-reduce each, dispatched without
  waiting (what a tree.map of small sharded operations does).
* `steps`: a small data=2 x fsdp=4 step dispatched `--steps` times, never waiting or waiting on the step 4 back.
On the 2-core development machine (2026-12-05), idle: with the default pool, 200 behind the slow program and 600
steps never waiting hung (XLA aborted after 52 s), 32 and 33 behind it and 600 steps waiting 4 back finished
(33 had hung in an earlier script of the same shape); with PJRT_NPROC=16 every case finished in 2.0-2.8 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from finetune import host_devices

BURST = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("d",))
big = jax.device_put(jnp.ones((8 * 512, 512)), NamedSharding(mesh, P("d")))
small = jax.device_put(jnp.ones((8,)), NamedSharding(mesh, P("d")))
slow = jax.jit(lambda a: jnp.sum(jnp.tanh(a @ a.T @ a)))
cheap = jax.jit(lambda a: a + jnp.sum(a))  # an all-reduce over the 8 devices
total = slow(big)
for _ in range(int(sys.argv[1])):
  small = cheap(small)
print(float(total), float(small[0]))
"""

STEPS = r"""
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


def case_environment(sized: bool) -> dict[str, str]:
  env = host_devices.environment(8)
  env["JAX_PLATFORMS"] = "cpu"
  # XLA aborts a collective some device has not joined after 40 s by default; 30 s keeps a hung case short.
  env["XLA_FLAGS"] += " --xla_cpu_collective_call_terminate_timeout_seconds=30"
  if not sized:
    env.pop(host_devices.THREADS_VARIABLE, None)
    env.pop("NPROC", None)
  return env


def run_case(code: str, args: list[str], sized: bool, timeout: float) -> str:
  env = case_environment(sized)
  start = time.perf_counter()
  try:
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                            timeout=timeout)
  except subprocess.TimeoutExpired:
    return f"hung (killed after {timeout:.0f} s)"
  seconds = time.perf_counter() - start
  if result.returncode == 0:
    return f"finished in {seconds:.1f} s"
  if "Termination timeout" in result.stderr:
    return f"hung (XLA aborted a collective after {seconds:.0f} s)"
  # Any other failure (an import error, a bad flag, an out-of-memory kill) is not the hang this script looks for.
  last_line = (result.stderr.strip().splitlines() or ["no stderr"])[-1]
  return f"failed (exit {result.returncode} after {seconds:.0f} s): {last_line}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--programs", type=int, default=200)
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--timeout", type=float, default=120.0)
  args = parser.parse_args()
  pools = {}
  for sized in (False, True):
    threads = host_devices.client_threads(8, case_environment(sized))
    pools[sized] = f"{'sized' if sized else 'default'} pool of {threads} threads"
  for sized in (False, True):
    for programs in (32, 33, args.programs):
      outcome = run_case(BURST, [str(programs)], sized, args.timeout)
      print(f"burst of {programs} behind a slow program, {pools[sized]}: {outcome}", flush=True)
    for bound in (0, 4):  # 4: finetune.train.MAX_STEPS_IN_FLIGHT
      label = "never waiting" if not bound else f"waiting on the step {bound} back"
      outcome = run_case(STEPS, [str(args.steps), str(bound)], sized, args.timeout)
      print(f"{args.steps} steps, {label}, {pools[sized]}: {outcome}", flush=True)


if __name__ == "__main__":
  main()
