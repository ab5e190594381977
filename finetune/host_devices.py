"""Fake CPU devices (XLA's --xla_force_host_platform_device_count), for trying a mesh on one machine, and the
thread count XLA's CPU client needs so that they do not hang.

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
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Mapping, MutableMapping, Sequence

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
THREADS_VARIABLE = "PJRT_NPROC"


def requested_devices(environ: Mapping[str, str]) -> int:
  """The host device count asked for: JAX_NUM_CPU_DEVICES (jax's config, which takes precedence), else XLA_FLAGS
  (XLA takes the last of repeated flags); 1 when neither asks."""
  if environ.get("JAX_NUM_CPU_DEVICES", "").isdigit():
    return int(environ["JAX_NUM_CPU_DEVICES"])
  counts = re.findall(rf"{DEVICE_COUNT_FLAG}=(\d+)", environ.get("XLA_FLAGS", ""))
  return int(counts[-1]) if counts else 1


def threads_needed(devices: int) -> int:
  """Client threads that `devices` host devices need never to hang (see the module docstring)."""
  return 2 * devices


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
  for them and PJRT_NPROC is sized for them (raised if set too small). For subprocesses; this process's devices
  exist already once jax has queried them."""
  result = dict(os.environ if environ is None else environ)
  result["XLA_FLAGS"] = f"{result.get('XLA_FLAGS', '')} {DEVICE_COUNT_FLAG}={devices}".strip()
  result.pop("JAX_NUM_CPU_DEVICES", None)  # (it would take precedence over the flag)
  if client_threads(devices, result) < threads_needed(devices):
    result[THREADS_VARIABLE] = str(threads_needed(devices))
  return result


def warn_if_short_of_threads(devices: Sequence[Any], environ: Mapping[str, str] | None = None) -> None:
  """Warns when `devices` (jax devices) are several CPU devices whose client has fewer threads than they need.
  The client exists already (it made them), so the fix is for the next process: library code that sets XLA_FLAGS
  itself, rather than through the `finetune` command, gets told. (Python shows a warning once per place.)"""
  if not devices or devices[0].platform != "cpu":
    return
  threads = client_threads(len(devices), os.environ if environ is None else environ)
  needed = threads_needed(len(devices))
  if threads < needed:
    warnings.warn(f"{len(devices)} CPU devices with {threads} XLA client threads: XLA's CPU client can hang in a "
                  f"collective when the host runs ahead (finetune/host_devices.py). Start the process with "
                  f"{THREADS_VARIABLE}={needed} (the `finetune` command sets it unless it is set), or call "
                  "finetune.host_devices.size_client_threads() before jax's first device query", stacklevel=2)
