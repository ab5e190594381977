"""Does XLA still compute wrong gradients for a chain of (fsdp, tensor)-sharded matmuls? (docs/architecture.md,
"Decisions (scale-out)": why the MLP alternates its axes and the LSTM's recurrent kernel is not fsdp-sharded.)

Plain JAX, no finetune code: the gradient of sum((x @ a @ b @ c) ** 2) on a data=2 x fsdp=2 x tensor=2 mesh of 8
fake CPU devices, against the same jitted gradient on one device, for several weight layouts and sizes. Prints the
worst relative error per case; anything above ~1e-6 is the bug. With jax/jaxlib 0.10.2 (2026-12-06/07, `--seed`
0, then 0-4): every chain of three or more fully sharded weights whose last two share a layout is wrong at 8 x 8
and 64 x 64 ((fsdp, tensor) x 3 at 8 x 8, batch 8: 0.99 (0.40-1.1 over seeds 0-4), at 64 x 64, batch 64: 1.1
(0.91-1.1); (tensor, fsdp) x 3 and the two mixed chains: 0.99 (0.40-1.1); x 4: 0.72 (0.11-0.87)), though right at
32 x 32, batch 8 (3e-7); two such layers, a chain ending in a switch of layout, strict alternation and the LSTM's
layout: 1e-7.
Re-run after upgrading jax; if every case is ~1e-7, the workaround is no longer needed:

    python benchmarks/xla_sharded_chain.py [--seed 0]
"""

from __future__ import annotations

import argparse
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("PJRT_NPROC", "16")  # (finetune/host_devices.py: fake devices need 2 threads each)

import jax  # noqa: E402  (after the flags: jax reads them when its CPU client starts)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

FSDP_TENSOR, TENSOR_FSDP = P("fsdp", "tensor"), P("tensor", "fsdp")
CASES = [  # (name, weight layouts, width, batch)
    ("(fsdp, tensor) x 3, 8 x 8, batch 8", [FSDP_TENSOR] * 3, 8, 8),
    ("(fsdp, tensor) x 3, 32 x 32, batch 8", [FSDP_TENSOR] * 3, 32, 8),
    ("(fsdp, tensor) x 3, 64 x 64, batch 64", [FSDP_TENSOR] * 3, 64, 64),
    ("(tensor, fsdp) x 3, 8 x 8, batch 8", [TENSOR_FSDP] * 3, 8, 8),
    ("(fsdp, tensor), (tensor, fsdp) x 2, 8 x 8, batch 8", [FSDP_TENSOR, TENSOR_FSDP, TENSOR_FSDP], 8, 8),
    ("(tensor, fsdp), (fsdp, tensor) x 2, 8 x 8, batch 8", [TENSOR_FSDP, FSDP_TENSOR, FSDP_TENSOR], 8, 8),
    ("(fsdp, tensor) x 4, 8 x 8, batch 8", [FSDP_TENSOR] * 4, 8, 8),
    ("(fsdp, tensor) x 2, 8 x 8, batch 8", [FSDP_TENSOR] * 2, 8, 8),
    ("(fsdp, tensor) x 2, (tensor, fsdp), 8 x 8, batch 8", [FSDP_TENSOR, FSDP_TENSOR, TENSOR_FSDP], 8, 8),
    ("alternating, 8 x 8, batch 8 (the MLP now)", [FSDP_TENSOR, TENSOR_FSDP, FSDP_TENSOR], 8, 8),
    ("(None, tensor) x 3, 8 x 8, batch 8 (the LSTM's recurrent kernel now)", [P(None, "tensor")] * 3, 8, 8),
]


def worst_relative_error(mesh: Mesh, layouts: list[P], width: int, batch: int, seed: int) -> float:
  rng = np.random.default_rng(seed)
  weights = [jnp.asarray(rng.uniform(-0.3, 0.3, (width, width)), jnp.float32) for _ in layouts]
  x = jnp.asarray(rng.normal(size=(batch, width)), jnp.float32)

  def loss(weights, x):
    for w in weights:
      x = x @ w
    return jnp.sum(x ** 2)

  reference = jax.jit(jax.grad(loss))(weights, x)  # one device
  weight_shardings = [NamedSharding(mesh, layout) for layout in layouts]
  batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
  sharded = jax.jit(jax.grad(loss), in_shardings=(weight_shardings, batch_sharding))(
      jax.device_put(weights, weight_shardings), jax.device_put(x, batch_sharding))
  return max(float(jnp.abs(g - r).max() / jnp.abs(r).max()) for g, r in zip(sharded, reference))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seed", type=int, default=0, help="draws the weights and inputs (the error varies with them)")
  args = parser.parse_args()
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, mesh data=2 x fsdp=2 x "
        "tensor=2")
  print(f"{'weights':<72}{'worst relative gradient error':>30}")
  for name, layouts, width, batch in CASES:
    print(f"{name:<72}{worst_relative_error(mesh, layouts, width, batch, args.seed):>30.2g}")


if __name__ == "__main__":
  main()
