"""Sentence classification from text files (`<integer label> <sentence>` per line, as in ../shared/data/text),
tokenised once with the checkpoint's own tokenizer (transformers `AutoTokenizer`, a fast Rust tokenizer, batched).

Options: `train_file` (required), `test_file` and `validation_file` (optional), relative to `config.data.path`;
`tokenizer`: a Hugging Face checkpoint directory (or hub id) with tokenizer files; `max_length`: every sequence is
padded or truncated to it, with an attention mask. A source-provided validation split replaces the one carved from
'train' when `config.data.validation_fraction` is 0.
"""

from __future__ import annotations

import os

import numpy as np

from finetune.data import SOURCES
from finetune.data.dataset import ArraySplit, Dataset
from finetune.errors import FinetuneError


def read_labelled_lines(filename: str) -> tuple[list[str], np.ndarray]:
  """(sentences, integer labels) from `<label> <sentence>` lines; blank lines are skipped."""
  sentences, labels = [], []
  with open(filename, encoding="utf-8", errors="replace") as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      label, _, sentence = line.partition(" ")
      if not label.lstrip("-").isdigit() or not sentence:
        raise FinetuneError(f"{filename}:{number} is not '<integer label> <sentence>': {line[:60]!r}")
      sentences.append(sentence)
      labels.append(int(label))
  if not sentences:
    raise FinetuneError(f"{filename} has no examples")
  return sentences, np.asarray(labels, np.int64)


def load_tokenizer(name_or_path: str):
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  if not name_or_path:
    raise FinetuneError("config.data.options.tokenizer is empty; set it to the checkpoint directory of the model")
  try:
    return AutoTokenizer.from_pretrained(os.path.expanduser(name_or_path))
  except Exception as e:  # missing files, offline hub id, corrupt tokenizer.json
    raise FinetuneError(f"cannot load a tokenizer from {name_or_path!r} ({type(e).__name__}); point "
                        "config.data.options.tokenizer at a checkpoint directory with tokenizer files") from None


def tokenize(tokenizer, sentences: list[str], max_length: int) -> dict[str, np.ndarray]:
  encoded = tokenizer(sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
  return {"input_ids": encoded["input_ids"].astype(np.int32),
          "attention_mask": encoded["attention_mask"].astype(np.int32)}


@SOURCES.register("text_classification")
def text_classification(path: str = "", cache_dir: str = "", train_file: str = "", test_file: str = "",
                        validation_file: str = "", tokenizer: str = "", max_length: int = 64) -> Dataset:
  del cache_dir  # tokenising a few thousand sentences takes well under a second
  if not train_file:
    raise FinetuneError("config.data.options.train_file is empty; name the training file (e.g. stsa.binary.train)")
  files = {"train": train_file, "test": test_file, "validation": validation_file}
  tok = load_tokenizer(tokenizer)
  splits, all_labels = {}, []
  for split, name in files.items():
    if not name:
      continue
    filename = os.path.join(path, name) if path else name
    if not os.path.isfile(filename):
      raise FinetuneError(f"text file {filename!r} does not exist; check config.data.path and "
                          f"config.data.options.{split}_file")
    sentences, labels = read_labelled_lines(filename)
    splits[split] = ArraySplit({**tokenize(tok, sentences, max_length), "label": labels})
    all_labels.append(labels)
  labels = np.concatenate(all_labels)
  if labels.min() < 0:
    raise FinetuneError(f"negative label {labels.min()} in {train_file}; labels must be 0..K-1")
  name = os.path.basename(train_file).split(".")[0]
  return Dataset(name, splits, tuple(str(i) for i in range(int(labels.max()) + 1)))


@SOURCES.register("lm_text")
def lm_text(path: str = "", cache_dir: str = "", train_file: str = "", test_file: str = "", tokenizer: str = "",
            block_size: int = 128) -> Dataset:
  """Language-model corpora from plain text (e.g. ../shared/data/lm): the whole file is tokenised once and cut
  into consecutive blocks of `block_size` tokens (the remainder is dropped); every token of a block is predicted
  from the ones before it (task 'causal_lm')."""
  del cache_dir
  if not train_file:
    raise FinetuneError("config.data.options.train_file is empty; name the text file (e.g. tinyshakespeare.txt)")
  tok = load_tokenizer(tokenizer)
  splits = {}
  for split, name in (("train", train_file), ("test", test_file)):
    if not name:
      continue
    filename = os.path.join(path, name) if path else name
    if not os.path.isfile(filename):
      raise FinetuneError(f"text file {filename!r} does not exist; check config.data.path and "
                          f"config.data.options.{split}_file")
    with open(filename, encoding="utf-8", errors="replace") as f:
      lines = f.read().splitlines()
    # Tokenised line by line (batched, fast) and joined: no special tokens inside the stream.
    ids = np.concatenate([np.asarray(t, np.int32) for t in
                          tok(lines, add_special_tokens=False)["input_ids"] if t] or [np.zeros(0, np.int32)])
    num_blocks = len(ids) // block_size
    if num_blocks == 0:
      raise FinetuneError(f"{filename} has {len(ids)} tokens, fewer than one block of {block_size}; lower "
                          "config.data.options.block_size")
    blocks = ids[:num_blocks * block_size].reshape(num_blocks, block_size)  # (N * T,) -> (N, T)
    splits[split] = ArraySplit({"input_ids": blocks, "attention_mask": np.ones_like(blocks)})
  return Dataset(os.path.basename(train_file).split(".")[0], splits, ())
