"""XLA's persistent compilation cache for `finetune train` and `finetune sweep`, on by default.

Why: a sweep recompiles the same programs in every point (points that differ in seed, learning rate or λ, and every
split of a Yosinski grid, build identical init, train and eval steps), and XLA's CPU compiler is slow on some of
them: on the 2-core development machine (shared with another job) one `jax.random.normal` took 2.6 s to compile,
and a tiny CNN's jitted initialiser 13 s. JAX can keep compiled executables on disk, keyed on the program, the
compile options, the jax/XLA versions and the backend, so a later run of the same program loads it instead of
compiling it and gets the same executable (no stale or approximate result). JAX leaves the cache off unless told
where to keep it; this module tells it.

Where: `$FINETUNE_COMPILATION_CACHE` if set and not empty (`off` disables the cache), else
`$XDG_CACHE_HOME/finetune/jax` (default `~/.cache/finetune/jax`). A non-empty `JAX_COMPILATION_CACHE_DIR` wins: JAX
reads it itself, and we leave it. Only compilations over JAX's `jax_persistent_cache_min_compile_time_secs` (1 s
by default) are stored. Things to know:
- The folder has no size limit (JAX's default): entries of old jax versions stay until you delete the folder.
- On a multi-host job only process 0 writes entries; give every host the same shared folder
  (`FINETUNE_COMPILATION_CACHE=/shared/path`) or the other hosts never find one.
- `finetune sweep --parallel N` processes may read an entry another one is still writing; JAX then warns and
  compiles, so results are unaffected.
- Library users (notebooks, scripts) call `finetune.compile_cache.enable()` themselves before their first jit
  (and after `jax.distributed.initialize`: it asks jax for the devices).
- Not on several CPU devices (host devices, or CPU processes of a multi-process job): there a program loaded from
  the cache can hang in its collectives (measured, finetune/host_devices.py), so `enable()` turns the cache off.
"""

from __future__ import annotations

import os

import jax

from finetune import host_devices

CACHE_DIR_VARIABLE = "FINETUNE_COMPILATION_CACHE"
OFF_VALUES = ("off", "0", "false")


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "finetune", "jax")


def enable() -> str | None:
  """Points JAX's persistent compilation cache at the folder above (call it before the first compilation).
  Returns the folder in use, or None when the cache is off."""
  if not jax.config.jax_enable_compilation_cache:  # JAX_ENABLE_COMPILATION_CACHE=false: the user turned it off
    return None
  if host_devices.several_cpu_devices():  # loaded multi-device CPU programs can hang (finetune/host_devices.py)
    jax.config.update("jax_enable_compilation_cache", False)  # also when JAX_COMPILATION_CACHE_DIR names a folder
    return None
  if os.environ.get("JAX_COMPILATION_CACHE_DIR", "").strip():
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  path = os.environ.get(CACHE_DIR_VARIABLE, "").strip()
  if path.lower() in OFF_VALUES:
    return None
  path = os.path.expanduser(path) if path else default_dir()
  jax.config.update("jax_compilation_cache_dir", path)
  return path
