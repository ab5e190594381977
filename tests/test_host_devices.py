"""Fake host devices: XLA's CPU client gets the threads they need (finetune/host_devices.py), so a host that runs
far ahead of them does not hang in a collective."""

from __future__ import annotations

import os
import subprocess
import sys
import types
import warnings

import pytest

from conftest import REPO
from finetune import cli, host_devices

FLAG = "--xla_force_host_platform_device_count"

# One slow sharded program, then 200 cheap ones with an all-reduce each, dispatched without waiting: with the
# client's default pool (8 threads for 8 devices on a 2-core machine) XLA aborted this every time (33 queued did once)
# (benchmarks/cpu_host_device_threads.py).
BURST = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("d",))
big = jax.device_put(jnp.ones((8 * 512, 512)), NamedSharding(mesh, P("d")))
small = jax.device_put(jnp.ones((8,)), NamedSharding(mesh, P("d")))
slow = jax.jit(lambda a: jnp.sum(jnp.tanh(a @ a.T @ a)))
cheap = jax.jit(lambda a: (a + jnp.sum(a)) / 9)  # an all-reduce; ones stay ones
total = slow(big)
for _ in range(200):
  small = cheap(small)
print(float(small[0]), float(total) > 0)
"""


def test_a_host_far_ahead_of_eight_host_devices_does_not_hang():
  env = host_devices.environment(8)
  # XLA aborts a collective that some device has not joined after this long (the hang, as it was).
  env["XLA_FLAGS"] += " --xla_cpu_collective_call_terminate_timeout_seconds=30"
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run([sys.executable, "-c", BURST], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["1.0", "True"]


@pytest.fixture
def environ():
  """A clean environment to size, as on a 2-core machine (NPROC, which XLA reads when PJRT_NPROC is unset)."""
  return {"PATH": os.environ.get("PATH", ""), "NPROC": "2"}


def test_requested_devices_reads_jax_s_setting_else_the_last_flag(environ):
  assert host_devices.requested_devices(environ) == 1
  environ["XLA_FLAGS"] = f"--xla_dump_to=/tmp/x {FLAG}=4 {FLAG}=8"
  assert host_devices.requested_devices(environ) == 8
  environ["JAX_NUM_CPU_DEVICES"] = "4"  # jax's own setting wins over XLA_FLAGS
  assert host_devices.requested_devices(environ) == 4


def test_client_threads_are_sized_for_the_requested_devices(environ):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    host_devices.size_client_threads(environ)
    assert "PJRT_NPROC" not in environ  # one device: nothing to size
    one_core = {"NPROC": "1"}
    host_devices.size_client_threads(one_core)
    assert "PJRT_NPROC" not in one_core and "PJRT_NPROC" not in host_devices.environment(1, one_core)
    environ["XLA_FLAGS"] = f"{FLAG}=8"
    assert host_devices.client_threads(8, environ) == 8  # the client's default on 2 cores: max(cores, devices)
    host_devices.size_client_threads(environ)
    assert environ["PJRT_NPROC"] == "16" and host_devices.client_threads(8, environ) == 16
    environ["PJRT_NPROC"] = "64"  # the user's own, larger: kept, silently
    host_devices.size_client_threads(environ)
    assert environ["PJRT_NPROC"] == "64"
    del environ["PJRT_NPROC"]
    environ["NPROC"] = "32"  # enough threads anyway: nothing set
    host_devices.size_client_threads(environ)
    assert "PJRT_NPROC" not in environ
    environ["PJRT_NPROC"] = "4"  # the user's own, too small: kept (make_mesh warns, below)
    host_devices.size_client_threads(environ)
    assert environ["PJRT_NPROC"] == "4"


def test_environment_asks_for_the_devices_and_their_threads(environ):
  environ["XLA_FLAGS"] = "--xla_cpu_enable_fast_math=false"
  environ["PJRT_NPROC"], environ["JAX_NUM_CPU_DEVICES"] = "4", "2"
  env = host_devices.environment(8, environ)
  assert env["XLA_FLAGS"] == f"--xla_cpu_enable_fast_math=false {FLAG}=8" and "JAX_NUM_CPU_DEVICES" not in env
  assert host_devices.requested_devices(env) == 8
  assert env["PJRT_NPROC"] == "16"
  assert environ["PJRT_NPROC"] == "4" and FLAG not in environ["XLA_FLAGS"]  # a copy
  environ["PJRT_NPROC"] = "64"
  assert host_devices.environment(8, environ)["PJRT_NPROC"] == "64"


def test_environment_turns_the_compilation_cache_off_for_several_devices(environ):
  environ["JAX_COMPILATION_CACHE_DIR"] = "/some/cache"
  assert host_devices.environment(8, environ)["JAX_ENABLE_COMPILATION_CACHE"] == "false"
  assert "JAX_ENABLE_COMPILATION_CACHE" not in host_devices.environment(1, environ)  # no collectives: cache kept


def test_the_cli_sizes_the_threads_before_anything_else(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", f"{FLAG}=8")
  monkeypatch.delenv("PJRT_NPROC", raising=False)
  monkeypatch.setenv("NPROC", "2")  # (as on a 2-core machine; read by XLA only when it creates a client)
  with pytest.raises(SystemExit):
    cli.main(["train", "--help"])
  assert os.environ["PJRT_NPROC"] == "16"


def test_too_few_client_threads_for_the_cpu_devices_are_reported(environ):
  cpus, gpus = [types.SimpleNamespace(platform="cpu")] * 8, [types.SimpleNamespace(platform="gpu")] * 8
  environ["PJRT_NPROC"] = "8"
  with pytest.warns(UserWarning, match="8 CPU devices with 8 XLA client threads.*PJRT_NPROC=16"):
    host_devices.warn_if_short_of_threads(cpus, environ)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    host_devices.warn_if_short_of_threads(gpus, environ)  # not XLA's CPU client
    host_devices.warn_if_short_of_threads(cpus[:1], environ)  # one device: no collectives
    host_devices.warn_if_short_of_threads(cpus[:1], {"NPROC": "1"})  # not even on one core
    environ["PJRT_NPROC"] = "16"
    host_devices.warn_if_short_of_threads(cpus, environ)
    # Two processes of 4 devices each: this process's client runs 4, for which its 8 threads suffice (the 8 devices
    # of the whole job were counted).
    environ["PJRT_NPROC"] = "8"
    job = [types.SimpleNamespace(platform="cpu", process_index=i // 4) for i in range(8)]
    host_devices.warn_if_short_of_threads(job, environ)


def test_a_compilation_cache_on_several_cpu_devices_is_reported():
  import jax  # pylint: disable=g-import-not-at-top
  cpus, gpus = [types.SimpleNamespace(platform="cpu")] * 8, [types.SimpleNamespace(platform="gpu")] * 8
  was = jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", "/some/cache")
    jax.config.update("jax_enable_compilation_cache", True)
    with pytest.warns(UserWarning, match=r"8 CPU devices with jax's persistent compilation cache on \(/some/cache\)"):
      host_devices.warn_if_cache_is_on(cpus)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      host_devices.warn_if_cache_is_on(gpus)  # not XLA's CPU runtime
      host_devices.warn_if_cache_is_on(cpus[:1])  # one device: no collectives
      jax.config.update("jax_enable_compilation_cache", False)  # as compile_cache.enable() leaves it there
      host_devices.warn_if_cache_is_on(cpus)
  finally:
    jax.config.update("jax_enable_compilation_cache", was[0])
    jax.config.update("jax_compilation_cache_dir", was[1])
