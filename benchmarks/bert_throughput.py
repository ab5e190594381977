"""Training throughput on the MiniLM-L6 shape (6 layers, hidden 384, 12 heads, sequence 64, batch 32): this
framework vs transformers + torch on the same CPU, for full fine-tuning, a frozen backbone and LoRA (r=8 on query
and value, the head trained; the reference is PEFT). Prints a table, with the bytes of trainable parameters plus
optimizer state of each setup.

    python benchmarks/bert_throughput.py [--steps 10] [--no-torch]

Also: compile time of our step, achieved FLOP/s (XLA's cost analysis of the compiled step / measured step time)
against this machine's float32 matmul ceiling (one large jnp.dot, timed here). torch is optional
(`pip install torch==2.13.0`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from finetune import train as train_lib
from finetune.config import build_config
from finetune.data.dataset import ArraySplit
from finetune.data.pipeline import InputPipeline
from finetune.partition import flatten
from finetune.sharding import batch_sharding

SHAPE = dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
             max_position_embeddings=512)
BATCH, LENGTH, CLASSES = 32, 64, 2


def matmul_ceiling(trials: int = 5) -> float:
  """FLOP/s of a float32 2048 x 2048 matmul: the best of `trials` trials of 5 calls (a ceiling is what the host can
  reach; one trial on a shared host read lower than the model steps timed after it)."""
  a = jnp.ones((2048, 2048), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = math.inf
  for _ in range(trials):
    start = time.perf_counter()
    for _ in range(5):
      out = f(a)
    out.block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 5 * 2 * 2048 ** 3 / best


def _batch(rng):
  ids = rng.integers(1000, SHAPE["vocab_size"], size=(BATCH, LENGTH)).astype(np.int32)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "label": rng.integers(0, CLASSES, BATCH)
          .astype(np.int32)}


SETUPS = {  # name -> our config overrides
    "full fine-tuning": {},
    "frozen backbone": {"freeze": {"patterns": ("^(?!head/)",)}},
    "LoRA r=8 query/value": {"peft": {"method": "lora", "targets": ("query", "value"), "rank": 8, "alpha": 16.0,
                                      "modules_to_save": ("^head/",)}},
}


def _synthetic_tokens() -> dict:
  """A token data source of the benchmark's shape, so the stage has token inputs and a CLASSES-way head."""
  return {"name": "synthetic", "batch_size": BATCH, "eval_batch_size": BATCH, "validation_fraction": 0.0,
          "eval_splits": ("test",), "options": {"kind": "tokens", "length": LENGTH, "vocab_size": SHAPE["vocab_size"],
                                                "num_classes": CLASSES, "num_examples": BATCH}}


def ours(setup: str, steps: int) -> tuple[float, float, float, int]:
  """(examples/s, compile seconds, FLOPs per step, bytes of trainable parameters + optimizer state)."""
  raw = {"model": {"name": "bert", **SHAPE, "dropout": 0.0},
         "data": _synthetic_tokens(), "train": {"steps": 100}, **SETUPS[setup]}
  config = build_config(raw)
  # The batches are our own synthetic token ids of the MiniLM shape (those of torch below).
  rng = np.random.default_rng(0)
  data = ArraySplit(_batch(rng))
  stage = dataclasses.replace(train_lib.build_stage(config), _cache={},
                              pipeline=InputPipeline("synthetic", ("0", "1"), data, {"validation": data}, BATCH,
                                                     BATCH, 0))
  start = time.perf_counter()
  train_fn = stage.train_step(0)
  compile_seconds = time.perf_counter() - start
  flops = train_fn.cost_analysis().get("flops", float("nan")) if train_fn.cost_analysis() else float("nan")
  state = stage.init_state(0)(jax.random.PRNGKey(0))
  trainable = stage.strategy.trainable(0)
  trained_bytes = sum(x.nbytes for p, x in flatten(state.params).items() if p in trainable) + sum(
      x.nbytes for x in jax.tree.leaves(state.opt_state))
  spec = batch_sharding(stage.mesh)
  batch = {k: jax.make_array_from_process_local_data(spec, v) for k, v in _batch(rng).items()}
  for _ in range(2):
    state, metrics = train_fn(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = train_fn(state, batch)
  jax.block_until_ready(metrics)
  return steps * BATCH / (time.perf_counter() - start), compile_seconds, flops, trained_bytes


def torch_reference(setup: str, steps: int) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  config = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                   intermediate_size=1536, num_labels=CLASSES, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)
  model = transformers.BertForSequenceClassification(config)
  if setup == "frozen backbone":
    for p in model.bert.parameters():
      p.requires_grad_(False)
  elif setup.startswith("LoRA"):
    import peft  # pylint: disable=g-import-not-at-top
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                       lora_dropout=0.0, task_type="SEQ_CLS"))
  optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
  batch = {k: torch.tensor(v, dtype=torch.long) for k, v in _batch(np.random.default_rng(0)).items()}
  labels = batch.pop("label")

  def step():
    optimizer.zero_grad()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()

  for _ in range(2):
    step()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  return steps * BATCH / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args()
  if args.steps < 1:
    parser.error(f"--steps {args.steps}: time at least 1 step")
  # Checked before anything is timed (the LoRA row, the last, is the one that needs peft).
  missing = [name for name in ("torch", "peft") if importlib.util.find_spec(name) is None]
  if missing and not args.no_torch:
    parser.error(f"the torch reference needs {' and '.join(missing)}: pip install -e '.[test]', or pass --no-torch")
  ceiling = matmul_ceiling()
  print(f"MiniLM-L6 shape, batch {BATCH} x {LENGTH} tokens, {jax.device_count()} {jax.devices()[0].platform} device; "
        f"float32 matmul ceiling {ceiling / 1e9:.0f} GFLOP/s")
  print(f"{'setup':<22} {'ours ex/s':>10} {'torch ex/s':>11} {'ratio':>6} {'compile s':>10} {'ours GFLOP/s':>13} "
        f"{'trained+opt MiB':>16}")
  for name in SETUPS:
    speed, compile_seconds, flops, trained_bytes = ours(name, args.steps)
    reference = float("nan") if args.no_torch else torch_reference(name, args.steps)
    achieved = flops * speed / BATCH
    print(f"{name:<22} {speed:>10.1f} {reference:>11.1f} {speed / reference:>6.2f} {compile_seconds:>10.1f} "
          f"{achieved / 1e9:>13.1f} {trained_bytes / 2**20:>16.2f}")


if __name__ == "__main__":
  main()
