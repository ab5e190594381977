"""Compiled memory of one training step, LoRA vs full fine-tuning, for a ~1B-parameter Llama-shaped model built
from abstract shapes only (nothing is allocated: `nnx.eval_shape` + ahead-of-time lowering of the real step).

    python benchmarks/peft_memory.py [--layers 22] [--batch 4] [--length 512]

The default shape is TinyLlama-1.1B's (hidden 2048, MLP 5632, 22 layers, 32 heads, 4 key/value heads, vocabulary
32000). For each setup it prints XLA's `memory_analysis()` of the compiled step: arguments (parameters, optimizer
state, batch), temporaries (activations kept for the backward pass, gradients, workspace) and their sum, plus the
trainable parameter count. Figures are for the CPU backend; GPU/TPU compilers schedule and fuse differently, so
temporaries differ there while argument bytes (parameters and optimizer state) are the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from finetune import train as train_lib
from finetune.config import build_config
from finetune.data.dataset import ArraySplit
from finetune.data.pipeline import InputPipeline

LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                num_key_value_heads=4, tie_word_embeddings=False)
SETUPS = {
    "full fine-tuning": {},
    "LoRA r=8 q,v": {"peft": {"method": "lora", "targets": ("q_proj", "v_proj"), "rank": 8, "alpha": 16.0}},
    "LoRA r=16 all linear": {"peft": {"method": "lora", "rank": 16, "alpha": 32.0,
                                      "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj")}},
    "QLoRA r=16 all linear": {"peft": {"method": "lora", "rank": 16, "alpha": 32.0, "quantize": "nf4",
                                       "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj")}},
}


def compiled_step(setup: str, layers: int, batch: int, length: int):
  raw = {"task": "causal_lm", "model": {"name": "llama", **LLAMA_1B, "num_hidden_layers": layers},
         "data": {"name": "synthetic", "batch_size": batch, "eval_batch_size": batch, "validation_fraction": 0.0,
                  "eval_splits": ("test",), "options": {"kind": "tokens", "length": length,
                                                        "vocab_size": LLAMA_1B["vocab_size"], "num_examples": batch,
                                                        # (labels unread by a causal LM: one class, so
                                                        # the 'no example of class' warning is not raised)
                                                        "num_classes": 1}},
         "train": {"steps": 100}, **SETUPS[setup]}
  stage = train_lib.build_stage(build_config(raw))
  ids = np.zeros((batch, length), np.int32)
  data = ArraySplit({"input_ids": ids, "attention_mask": np.ones_like(ids), "label": np.zeros(batch, np.int32)})
  stage = dataclasses.replace(stage, _cache={}, pipeline=InputPipeline("synthetic", ("0",), data, {"v": data}, batch,
                                                                       batch, 0))
  start = time.perf_counter()
  compiled = stage.train_step(0)
  return compiled, stage, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=22)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=512)
  args = parser.parse_args()
  gib = 2 ** 30
  print(f"Llama shape {LLAMA_1B}, {args.layers} layers; batch {args.batch} x {args.length} tokens; float32")
  print(f"{'setup':<22} {'params':>14} {'trainable':>12} {'arguments GiB':>14} {'temporaries GiB':>16} "
        f"{'total GiB':>10} {'vs full':>8} {'compile s':>10}")
  full_total = None
  for setup in SETUPS:
    compiled, stage, seconds = compiled_step(setup, args.layers, args.batch, args.length)
    memory = compiled.memory_analysis()
    total = memory.argument_size_in_bytes + memory.temp_size_in_bytes
    full_total = full_total or total
    counts = stage.peft_info or stage.strategy.counts(0)
    params = counts.get("total_params", counts.get("params"))
    trainable = counts.get("trainable_params", counts.get("trainable"))
    print(f"{setup:<22} {params:>14,} {trainable:>12,} {memory.argument_size_in_bytes / gib:>14.2f} "
          f"{memory.temp_size_in_bytes / gib:>16.2f} {total / gib:>10.2f} {total / full_total:>8.2f} "
          f"{seconds:>10.1f}")


if __name__ == "__main__":
  main()
