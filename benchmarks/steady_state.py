"""Steady-state seconds per call, for the benchmark scripts that time a compiled step.

One timed call of a few milliseconds on a shared 2-core host varies by tens of percent from run to run, more than
the effects the scripts report, and timing modes one after another lets a slow spell of the host land on one mode
only. So: one warm-up call (compilation, first-call allocation) is left out; each trial repeats the call for at
least `min_trial_seconds` and waits for the device only at its end (JAX dispatches asynchronously); the modes'
trials are interleaved; and the median trial is reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax

# name -> (step, carry, args): step(carry, *args) -> (carry, outputs); the carry may be donated.
Runs = dict[str, tuple[Callable[..., tuple[Any, Any]], Any, tuple]]


def seconds_per_call(runs: Runs, trials: int = 5, min_trial_seconds: float = 0.25) -> dict[str, float]:
  """{name: median over `trials` of the seconds one call of that run's step takes}."""
  carries, calls_per_trial = {}, {}
  for name, (step, carry, args) in runs.items():
    carry, outputs = step(carry, *args)  # warm-up: compiles a jitted step
    jax.block_until_ready((carry, outputs))
    # Calls per trial: doubled until a trial, timed as the trials are (one wait at the end), lasts long enough. (One
    # waited-for call includes the dispatch and wait that back-to-back calls overlap: scaling from it gave trials
    # of a tenth of the target.)
    calls = 1
    while True:
      started = time.perf_counter()
      for _ in range(calls):
        carry, outputs = step(carry, *args)
      jax.block_until_ready((carry, outputs))
      if time.perf_counter() - started >= min_trial_seconds:
        break
      calls *= 2
    calls_per_trial[name] = calls
    carries[name] = carry
  samples = {name: [] for name in runs}
  for _ in range(trials):
    for name, (step, _, args) in runs.items():
      carry = carries[name]
      started = time.perf_counter()
      for _ in range(calls_per_trial[name]):
        carry, outputs = step(carry, *args)
      jax.block_until_ready((carry, outputs))
      samples[name].append((time.perf_counter() - started) / calls_per_trial[name])
      carries[name] = carry
  return {name: statistics.median(values) for name, values in samples.items()}
