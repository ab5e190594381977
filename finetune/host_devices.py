"""Fake CPU devices (XLA's --xla_force_host_platform_device_count), for trying a mesh on one machine, and what they
need so that they do not hang: enough threads in XLA's CPU client, and no programs from the compilation cache.

Why the threads: XLA's CPU client (xla/pjrt/cpu/cpu_client.cc, jaxlib 0.10) launches a multi-device program by
scheduling one launch task per device on its thread pool, and later runs each device's part on the same pool. A
launch blocks its thread while its device has too many programs unfinished (a semaphore, about 32). When the
host gets that far ahead, the launches of the next program hold pool threads while the parts of the oldest
program still waiting to start need one, and the parts already running wait in an all-reduce for them: nothing
moves, until XLA aborts the process or forever. The pool has max(cores, devices) threads: 8 on a 2-core machine
with 8 host devices. Measured (benchmarks/cpu_host_device_threads.py): one slow sharded program and 200 cheap
all-reduces behind it, dispatched without waiting, hang every time with 8 threads (33 behind it did once), and
finish with 16.
With 2 x devices threads one is always free for the program that must finish first: at most `devices` launches
block at a time (the host waits for a program's launches before dispatching the next) and at most `devices - 1`
parts wait in a collective (programs with collectives run one at a time). PJRT_NPROC sets the pool's size; XLA
reads it once, when jax creates the CPU client at its first device query.

Why no compilation cache: with jaxlib 0.10 a multi-device CPU program that JAX loads from its persistent compilation
cache can hang in its collectives where the same program compiled in the process runs. Measured on the 2-core
machine with 8 host devices: tests/test_scan.py's Llama stage with the residual stream split over 'tensor' hung in
its first train steps in all 9 runs that loaded every program from the cache (3 of them with synchronous dispatch,
so one program alone hangs), and finished in all 4 runs that compiled them and in 6 that compiled some of them. In
the hang two devices wait for each other in two different collectives of one program run (op 2 and op 70 of
devices [0, 2]); a program whose collectives run in one order on every device cannot do that. How the loaded
program loses that order is not established. This hang refused the last CI run (most likely the one before too):
the development runs had started from an empty cache and passed, CI's found it filled. So on several CPU devices
the cache stays off: `environment()` turns it off for a subprocess, and `compile_cache.enable()` (the `finetune`
command) for this process.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Mapping, MutableMapping, Sequence

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
THREADS_VARIABLE = "PJRT_NPROC"
CACHE_SWITCH_VARIABLE = "JAX_ENABLE_COMPILATION_CACHE"  # jax's own switch for its persistent compilation cache


def requested_devices(environ: Mapping[str, str]) -> int:
  """The host device count asked for: JAX_NUM_CPU_DEVICES (jax's config, which takes precedence), else XLA_FLAGS
  (XLA takes the last of repeated flags); 1 when neither asks."""
  if environ.get("JAX_NUM_CPU_DEVICES", "").isdigit():
    return int(environ["JAX_NUM_CPU_DEVICES"])
  counts = re.findall(rf"{DEVICE_COUNT_FLAG}=(\d+)", environ.get("XLA_FLAGS", ""))
  return int(counts[-1]) if counts else 1


def threads_needed(devices: int) -> int:
  """Client threads that `devices` host devices need never to hang (see the module docstring); one device runs no
  collective, so any pool does."""
  return 2 * devices if devices > 1 else 1


def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def client_threads(devices: int, environ: Mapping[str, str]) -> int:
  """The thread pool XLA's CPU client will have for `devices` (its DefaultThreadPoolSize): PJRT_NPROC, else NPROC,
  else the cores; never fewer than the devices."""
  given = next((int(environ[name]) for name in (THREADS_VARIABLE, "NPROC") if environ.get(name, "").isdigit()), 0)
  return max(given or _cores(), devices)


def size_client_threads(environ: MutableMapping[str, str] | None = None) -> None:
  """Sets PJRT_NPROC for the host devices asked for (`requested_devices`) when the client would otherwise have too
  few threads; a PJRT_NPROC the user set is kept (`sharding.make_mesh` warns when it is too small). Call before
  jax's first device query (the CLI does, first thing)."""
  environ = os.environ if environ is None else environ
  devices = requested_devices(environ)
  if THREADS_VARIABLE not in environ and client_threads(devices, environ) < threads_needed(devices):
    environ[THREADS_VARIABLE] = str(threads_needed(devices))


def environment(devices: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
  """A copy of `environ` (default: this process's) for a process with `devices` host devices: XLA_FLAGS asks
  for them, PJRT_NPROC is sized for them (raised if set too small) and, for several, the compilation cache is off.
  For subprocesses; this process's devices exist already once jax has queried them."""
  result = dict(os.environ if environ is None else environ)
  result["XLA_FLAGS"] = f"{result.get('XLA_FLAGS', '')} {DEVICE_COUNT_FLAG}={devices}".strip()
  result.pop("JAX_NUM_CPU_DEVICES", None)  # (it would take precedence over the flag)
  if client_threads(devices, result) < threads_needed(devices):
    result[THREADS_VARIABLE] = str(threads_needed(devices))
  if devices > 1:
    result[CACHE_SWITCH_VARIABLE] = "false"  # (see the module docstring)
  return result


def several_cpu_devices() -> bool:
  """Whether this process computes on several CPU devices (host devices, or the CPU processes of a multi-process
  job), where programs have collectives and must not come from the compilation cache. Queries jax's devices: call
  it after `jax.distributed.initialize`."""
  import jax  # pylint: disable=g-import-not-at-top  (this module is imported before jax may be configured)
  return _several_cpu(jax.devices())


def _several_cpu(devices: Sequence[Any]) -> bool:
  return len(devices) > 1 and devices[0].platform == "cpu"


def warn_if_short_of_threads(devices: Sequence[Any], environ: Mapping[str, str] | None = None) -> None:
  """Warns when `devices` (jax devices) are several CPU devices whose client has fewer threads than they need.
  The client exists already (it made them), so the fix is for the next process: library code that sets XLA_FLAGS
  itself, rather than through the `finetune` command, gets told. (Python shows a warning once per place.)"""
  import jax  # pylint: disable=g-import-not-at-top
  # Each process's client runs its own devices only: a multi-process job counts this process's.
  devices = [d for d in devices if getattr(d, "process_index", 0) == jax.process_index()]
  if not _several_cpu(devices):
    return
  threads = client_threads(len(devices), os.environ if environ is None else environ)
  needed = threads_needed(len(devices))
  if threads < needed:
    warnings.warn(f"{len(devices)} CPU devices with {threads} XLA client threads: XLA's CPU client can hang in a "
                  f"collective when the host runs ahead (finetune/host_devices.py). Start the process with "
                  f"{THREADS_VARIABLE}={needed} (the `finetune` command sets it unless it is set), or call "
                  "finetune.host_devices.size_client_threads() before jax's first device query", stacklevel=2)


def warn_if_cache_is_on(devices: Sequence[Any]) -> None:
  """Warns when `devices` (jax devices) are several CPU devices and jax's persistent compilation cache is on: a
  program loaded from it can hang (see the module docstring). For library code that turned the cache on itself;
  `compile_cache.enable()` (the `finetune` command) leaves it off there."""
  if not _several_cpu(devices):
    return
  import jax  # pylint: disable=g-import-not-at-top
  if jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir:
    warnings.warn(f"{len(devices)} CPU devices with jax's persistent compilation cache on "
                  f"({jax.config.jax_compilation_cache_dir}): a multi-device CPU program loaded from it can hang in "
                  f"its collectives (finetune/host_devices.py). Set {CACHE_SWITCH_VARIABLE}=false, or call "
                  "finetune.compile_cache.enable() (which leaves it off here) instead of turning it on",
                  stacklevel=2)
