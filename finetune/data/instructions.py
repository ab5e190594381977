"""Instruction data in JSONL for supervised fine-tuning of causal LMs: Alpaca, ShareGPT and OpenAI-chat formats.

Each line is one conversation, in any of:
  * Alpaca:      {"instruction": ..., "input": ... (optional), "output": ...}
  * ShareGPT:    {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
  * OpenAI chat: {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}
All become a list of {role, content} messages, rendered with the tokenizer's chat template when it has one (else a
plain "### User: / ### Assistant:" template with an end-of-text token after each answer). The loss counts only the
answer tokens (`loss_mask`), found by rendering the conversation prefix by prefix: an answer is what its turn adds
after the assistant header (the prefix rendered with the generation prompt). Exact duplicate
conversations are dropped; with `pack=True` conversations are concatenated into full `max_length` blocks (fewer
padding tokens; attention still spans the block, as in common SFT packing).
"""

from __future__ import annotations

import json
import os

import numpy as np

from finetune.data import SOURCES
from finetune.data.dataset import ArraySplit, Dataset
from finetune.data.text import data_file, load_tokenizer, require_length
from finetune.errors import FinetuneError

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def to_messages(record: dict, where: str) -> list[dict[str, str]]:
  """One JSONL record in any supported format -> [{'role', 'content'}, ...]."""
  try:
    messages = _to_messages(record, where)
  except (KeyError, TypeError, AttributeError) as e:
    raise FinetuneError(f"{where}: malformed record ({type(e).__name__}: {e}); see finetune/data/instructions.py "
                        "for the accepted formats") from None
  for message in messages:
    if message["role"] not in ("system", "user", "assistant") or not isinstance(message["content"], str):
      raise FinetuneError(f"{where}: a message needs role system/user/assistant and text content; got {message!r}")
  return messages


def _to_messages(record: dict, where: str) -> list[dict[str, str]]:
  if not isinstance(record, dict):
    raise FinetuneError(f"{where}: each line must be a JSON object")
  if "messages" in record:
    return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
  if "conversations" in record:
    try:
      return [{"role": _SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in record["conversations"]]
    except KeyError as e:
      raise FinetuneError(f"{where}: ShareGPT turn with unknown speaker {e}; use human/gpt/system") from None
  if "instruction" in record and "output" in record:
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
  raise FinetuneError(f"{where}: not Alpaca (instruction/output), ShareGPT (conversations) or OpenAI chat "
                      f"(messages); keys: {', '.join(sorted(record))}")


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
  """The conversation as text; with `add_generation_prompt`, followed by the header that opens an assistant turn."""
  if getattr(tokenizer, "chat_template", None):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
  # No template: a plain one, with the end-of-text token after each answer so the model learns to stop.
  end = tokenizer.eos_token or tokenizer.sep_token or ""
  text = "".join(f"### {m['role'].capitalize()}:\n{m['content']}{end if m['role'] == 'assistant' else ''}\n\n"
                 for m in messages)
  return text + ("### Assistant:\n" if add_generation_prompt else "")


def tokenize_conversation(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
  """(token ids, loss mask): 1 on the tokens of assistant answers, 0 on prompts and on the template's headers.

  Each turn is found by rendering the conversation prefix by prefix; for an assistant turn, the prefix rendered
  with the generation prompt ends where the answer starts, so the role header is not trained on.
  """
  ids: list[int] = []
  mask: list[int] = []

  def extend(text: str, weight: int):
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokens[:len(ids)] != ids:  # a template that rewrites earlier turns when one is added
      raise FinetuneError("the chat template changes earlier turns when a turn is added; cannot mark responses")
    mask.extend([weight] * (len(tokens) - len(ids)))
    ids.extend(tokens[len(ids):])

  for end in range(1, len(messages) + 1):
    if messages[end - 1]["role"] == "assistant":
      extend(render(tokenizer, messages[:end - 1], add_generation_prompt=True), 0)
    extend(render(tokenizer, messages[:end]), 1 if messages[end - 1]["role"] == "assistant" else 0)
  return ids, mask


@SOURCES.register("instructions")
def instructions(path: str = "", cache_dir: str = "", train_file: str = "", test_file: str = "", tokenizer: str = "",
                 max_length: int = 256, pack: bool = False, deduplicate: bool = True) -> Dataset:
  del cache_dir
  if not train_file:
    raise FinetuneError("config.data.options.train_file is empty; name the JSONL file of conversations")
  require_length("max_length", max_length, 2)  # (a token to predict and one before it)
  tok = load_tokenizer(tokenizer)
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
  splits = {}
  for split, name in (("train", train_file), ("test", test_file)):
    if not name:
      continue
    filename = data_file(path, name, split)
    conversations, seen = [], set()
    with open(filename, "rb") as f:
      for number, raw_line in enumerate(f, 1):
        # JSON text is UTF-8 (RFC 8259), so another encoding is an error here, not something to guess around.
        try:
          line = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
          raise FinetuneError(f"{filename}:{number} is not UTF-8 (byte {raw_line[e.start]:#x} at column "
                              f"{e.start + 1}); save the file as UTF-8") from None
        if not line.strip():
          continue
        try:
          messages = to_messages(json.loads(line), f"{filename}:{number}")
        except json.JSONDecodeError as e:
          raise FinetuneError(f"{filename}:{number} is not JSON ({e.msg})") from None
        key = json.dumps(messages, sort_keys=True)
        if deduplicate and key in seen:
          continue
        seen.add(key)
        conversations.append(tokenize_conversation(tok, messages))
    splits[split] = _arrays(conversations, max_length, pack, pad_id)
  return Dataset(os.path.basename(train_file).split(".")[0], splits, ())


def _arrays(conversations: list[tuple[list[int], list[int]]], max_length: int, pack: bool, pad_id: int) -> ArraySplit:
  if pack:  # one stream, cut into full blocks; the tail shorter than a block is dropped
    ids = [t for conversation, _ in conversations for t in conversation]
    mask = [m for _, conversation_mask in conversations for m in conversation_mask]
    blocks = len(ids) // max_length
    if not blocks:
      raise FinetuneError(f"the conversations hold {len(ids)} tokens, fewer than one packed block of {max_length}")
    shape = (blocks, max_length)
    input_ids = np.asarray(ids[:blocks * max_length], np.int32).reshape(shape)  # (N * T,) -> (N, T)
    return ArraySplit({"input_ids": input_ids, "attention_mask": np.ones(shape, np.int32),
                       "loss_mask": np.asarray(mask[:blocks * max_length], np.int32).reshape(shape)})
  input_ids = np.full((len(conversations), max_length), pad_id, np.int32)
  attention = np.zeros_like(input_ids)
  loss_mask = np.zeros_like(input_ids)
  for row, (ids, mask) in enumerate(conversations):
    ids, mask = ids[:max_length], mask[:max_length]  # truncated on the right
    input_ids[row, :len(ids)] = ids
    attention[row, :len(ids)] = 1
    loss_mask[row, :len(ids)] = mask
  return ArraySplit({"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask})
