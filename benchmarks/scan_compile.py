"""Compile time of the train step vs depth, scanned (`train.scan_layers`) and unrolled.

    python benchmarks/scan_compile.py [--depths 2,4,8,16] [--width 128]

For a Llama-shaped model on synthetic tokens it builds the stage from shapes and times the ahead-of-time compile of
its train step (full fine-tuning and LoRA q,v), then the step (median of 5 trials of at least 0.25 s each, the
unrolled and scanned steps' trials interleaved: `steady_state`), for each depth. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import time

import jax

from finetune import train as train_lib
from finetune.config import build_config
from finetune.data.pipeline import to_global
from finetune.sharding import batch_sharding

import steady_state  # benchmarks/steady_state.py, beside this script


def config(depth: int, width: int, scanned: bool, lora: bool):
  return build_config({
      "task": "causal_lm",
      "model": {"name": "llama", "vocab_size": 512, "hidden_size": width, "intermediate_size": 4 * width,
                "num_hidden_layers": depth, "num_attention_heads": 4, "num_key_value_heads": 2},
      "data": {"name": "synthetic", "batch_size": 4, "eval_batch_size": 4, "validation_fraction": 0.0,
               "eval_splits": ("test",), "options": {"kind": "tokens", "length": 64, "vocab_size": 512,
                                                     "num_classes": 2, "num_examples": 8}},
      "train": {"steps": 2, "scan_layers": scanned},
      "peft": {"method": "lora", "targets": ("q_proj", "v_proj"), "rank": 8} if lora else {"method": ""},
  })


def measure(depth: int, width: int, lora: bool) -> dict[str, tuple[float, float]]:
  """{'unrolled' | 'scanned': (compile seconds, seconds per step)}; the two steps' trials are interleaved, so a
  slow spell of the host does not land on one of them only."""
  compile_seconds, runs = {}, {}
  for mode, scanned in (("unrolled", False), ("scanned", True)):
    stage = train_lib.build_stage(config(depth, width, scanned, lora))
    started = time.perf_counter()
    step = stage.train_step(0)
    compile_seconds[mode] = time.perf_counter() - started
    state = stage.init_state(0)(jax.random.PRNGKey(0))
    runs[mode] = (step, state, (to_global(stage.pipeline.train_batch(0), batch_sharding(stage.mesh)),))
  step_seconds = steady_state.seconds_per_call(runs)
  return {mode: (compile_seconds[mode], step_seconds[mode]) for mode in runs}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depths", default="2,4,8,16")
  parser.add_argument("--width", type=int, default=128)
  args = parser.parse_args()
  print(f"{jax.device_count()} {jax.devices()[0].platform} device(s); Llama width {args.width}, batch 4 x 64 tokens")
  print(f"{'method':<6} {'depth':>5}  {'compile s (unrolled)':>20}  {'compile s (scanned)':>19}  "
        f"{'step ms (unrolled)':>18}  {'step ms (scanned)':>17}")
  for lora in (False, True):
    for depth in map(int, args.depths.split(",")):
      times = measure(depth, args.width, lora)
      unrolled, scanned = times["unrolled"], times["scanned"]
      print(f"{'lora' if lora else 'full':<6} {depth:>5}  {unrolled[0]:>20.2f}  {scanned[0]:>19.2f}  "
            f"{unrolled[1] * 1e3:>18.1f}  {scanned[1] * 1e3:>17.1f}", flush=True)


if __name__ == "__main__":
  main()
