"""Instruction data in JSONL for supervised fine-tuning of causal LMs: Alpaca, ShareGPT and OpenAI-chat formats.

Each line is one conversation, in any of:
  * Alpaca:      {"instruction": ..., "input": ... (optional), "output": ...}
  * ShareGPT:    {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
  * OpenAI chat: {"messages": [{"role": "user"|"assistant"|"system", "content": ..., "weight": 0|1}, ...]}
                 (an assistant message with "weight": 0 stays in the context and is not trained on)
All become a list of {role, content} messages, rendered with the tokenizer's chat template when it has one (else a
plain "### User: / ### Assistant:" template with an end-of-text token after each answer, after the tokenizer's
beginning-of-text token where it adds one to text). The loss counts only the answer tokens (`loss_mask`), found by
rendering the conversation prefix by prefix: an answer is what its turn adds after the assistant header (the prefix
rendered with the generation prompt; for a template without one, the turn rendered up to a placeholder answer). A
conversation with no answer to train on is refused, naming its line. Exact duplicate
conversations are dropped; with `pack=True` conversations are concatenated into full `max_length` blocks (fewer
padding tokens) whose attention mask numbers the conversations 1, 2, ... instead of holding ones: each token attends
only to its own conversation, positions and LSTM state restart with each, and no conversation's first token is
predicted from the one before, so a packed conversation is computed as it would be alone (the first one of a block
may begin mid-conversation, and the last may be cut). Only what trains is packed: the test split and validation
(carved from the train file's conversations before the rest are packed, via `Dataset.train_from_rows`) keep one
conversation per row, so their loss is over every answer token within max_length (packing would drop the tail and
leave each block's first token unpredicted; the carve is checked for answers as the test file is), validation
shares no conversation with training, and their losses compare between packed and unpacked runs.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import numpy as np

from finetune.data import SOURCES
from finetune.data.dataset import ArraySplit, Dataset
from finetune.data.text import data_file, load_tokenizer, require_length
from finetune.errors import FinetuneError

_PROBE = "\u2063finetune-answer\u2063"  # stands for an answer's content, to find where a template puts it
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
    if "weight" in message and (message["role"] != "assistant" or message["weight"] not in (0, 1)
                                or isinstance(message["weight"], bool)):
      raise FinetuneError(f"{where}: 'weight' is 0 or 1 on an assistant message (0: not trained on); got "
                          f"{message!r}")
  return messages


def _to_messages(record: dict, where: str) -> list[dict[str, str]]:
  if not isinstance(record, dict):
    raise FinetuneError(f"{where}: each line must be a JSON object")
  if "messages" in record:
    # OpenAI's format marks assistant turns not to train on with "weight": 0 (they stay in the context).
    return [{"role": m["role"], "content": m["content"], **({"weight": m["weight"]} if "weight" in m else {})}
            for m in record["messages"]]
  if "conversations" in record:
    messages = []
    for turn in record["conversations"]:
      if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise FinetuneError(f"{where}: a ShareGPT turn needs 'from' and 'value' keys; got {turn!r}")
      if turn["from"] not in _SHAREGPT_ROLES:
        raise FinetuneError(f"{where}: ShareGPT turn with unknown speaker {turn['from']!r}; use human/gpt/system")
      messages.append({"role": _SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages
  if "instruction" in record and "output" in record:
    for key in ("instruction", "input", "output"):
      if record.get(key) is not None and not isinstance(record[key], str):  # (an 'input' dict became its repr)
        raise FinetuneError(f"{where}: Alpaca field {key!r} must be text; got {type(record[key]).__name__} "
                            f"{str(record[key])[:60]}")
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
  raise FinetuneError(f"{where}: not Alpaca (instruction/output), ShareGPT (conversations) or OpenAI chat "
                      f"(messages); keys: {', '.join(sorted(record))}")


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False, where: str = "") -> str:
  """The conversation as text; with `add_generation_prompt`, followed by the header that opens an assistant turn."""
  if getattr(tokenizer, "chat_template", None):
    try:
      return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2 raises what a template's raise_exception says (e.g. no system role)
      raise FinetuneError(f"{where or 'a conversation'}: the tokenizer's chat template refused it: "
                          f"{type(e).__name__}: {e}") from None
  # No template: a plain one, with the end-of-text token after each answer so the model learns to stop, and the
  # beginning-of-text token first where the tokenizer adds one to text (Llama's <s>): the text is tokenised without
  # special tokens, so it must be in the text, or the model would be fine-tuned without the token it was pretrained
  # and is prompted with.
  end = tokenizer.eos_token or tokenizer.sep_token or ""
  text = "".join(f"### {m['role'].capitalize()}:\n{m['content']}{end if m['role'] == 'assistant' else ''}\n\n"
                 for m in messages)
  return _bos(tokenizer) + text + ("### Assistant:\n" if add_generation_prompt else "")


def plain_chat_template(tokenizer) -> str:
  """`render`'s plain template as a Jinja chat template, for a tokenizer without one: an exported model's tokenizer
  carries it, so `apply_chat_template` builds the prompts the model was fine-tuned on. Its special tokens are
  written in as text, as `render` writes them (apply_chat_template tokenises without adding special tokens). Every
  newline is an expression: transformers renders templates with trim_blocks, which drops one after a block tag."""
  def literal(text: str) -> str:
    # (A JSON string is a valid Jinja string literal; ensure_ascii=False, as Jinja decodes an emoji's \ud83d\ude00
    # escape pair into two lone surrogates.)
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"
  end = tokenizer.eos_token or tokenizer.sep_token or ""
  return (literal(_bos(tokenizer)) + "{% for message in messages %}### {{ message['role'] | capitalize }}:" +
          literal("\n") + "{{ message['content'] }}{% if message['role'] == 'assistant' %}" + literal(end) +
          "{% endif %}" + literal("\n\n") + "{% endfor %}{% if add_generation_prompt %}" +
          literal("### Assistant:\n") + "{% endif %}")


@functools.lru_cache(maxsize=8)  # (render runs twice per turn of every conversation: ask the tokenizer once)
def _bos(tokenizer) -> str:
  """The tokenizer's beginning-of-text token if it puts one before text of its own accord, else ''."""
  bos_id = getattr(tokenizer, "bos_token_id", None)
  if bos_id is None or not getattr(tokenizer, "bos_token", None):
    return ""
  return tokenizer.bos_token if tokenizer("a")["input_ids"][:1] == [bos_id] else ""


def tokenize_conversation(tokenizer, messages: list[dict[str, str]], where: str = "") -> tuple[list[int], list[int]]:
  """(token ids, loss mask): 1 on the tokens of assistant answers, 0 on prompts and on the template's headers.

  Each turn is found by rendering the conversation prefix by prefix; for an assistant turn, the prefix rendered
  with the generation prompt ends where the answer starts, so the role header is not trained on. The answers are
  character spans of the whole conversation's text, which is tokenized once and its tokens marked by their offsets:
  tokenizing the prefixes instead would not give prefixes of the tokens (GPT-2's BPE writes a final "\n\n" as one
  token, and as two when "###" follows). Tokenizers without offsets (slow ones) tokenize prefix by prefix.
  """
  text, answers = "", []  # answers: (start, stop) character spans in the final text
  weights = [message.get("weight", 1) for message in messages]
  messages = [{"role": message["role"], "content": message["content"]} for message in messages]  # what templates see

  def grow(longer: str) -> str:
    if not longer.startswith(text):  # a template that rewrites earlier turns when one is added
      raise FinetuneError(f"{where or 'a conversation'}: the chat template changes earlier turns when a turn is "
                          "added; cannot mark responses")
    return longer

  for end in range(1, len(messages) + 1):
    if messages[end - 1]["role"] == "assistant":
      prompt = render(tokenizer, messages[:end - 1], add_generation_prompt=True, where=where)
      if prompt == text and getattr(tokenizer, "chat_template", None):
        # A template without a generation prompt: the assistant header is what the turn adds before its content
        # (ChatML written without one trained on "<|im_start|>assistant\n"; Llama 2's adds only " ").
        probe = render(tokenizer, messages[:end - 1] + [{"role": "assistant", "content": _PROBE}], where=where)
        at = probe.find(_PROBE, len(text))
        prompt = probe[:at] if at >= 0 else prompt
      text = grow(prompt)
    full = grow(render(tokenizer, messages[:end], where=where))
    if messages[end - 1]["role"] == "assistant" and weights[end - 1]:  # (without the newlines after the end token)
      answers.append((len(text), len(full.rstrip())))
    text = full
  # verbose=False: a conversation longer than the model's maximum never reaches it as it is (rows are max_length;
  # packing cuts blocks of max_length), and transformers would warn of indexing errors.
  if getattr(tokenizer, "is_fast", False):
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    # A token belongs to an answer if it overlaps it: SentencePiece's "▁Blue" (and byte-level BPE's " Blue" when
    # offsets keep the space) starts on the space that ends a header such as "Assistant: ", and was left out.
    mask = [int(any(first < stop and (last > start or first >= start) for start, stop in answers))
            for first, last in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask
  ids: list[int] = []
  mask = []
  for start, stop in [(0, 0)] + answers + [(len(text), len(text))]:
    for piece_end, weight in ((start, 0), (stop, 1)):
      tokens = tokenizer(text[:piece_end], add_special_tokens=False, verbose=False)["input_ids"]
      if tokens[:len(ids)] != ids:
        raise FinetuneError(f"{where or 'a conversation'}: the tokenizer splits the text differently once a turn "
                            "is added, and has no offsets to mark answers by (use its fast version)")
      mask.extend([weight] * (len(tokens) - len(ids)))
      ids.extend(tokens[len(ids):])
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
  splits, train_from_rows, check_validation_rows = {}, None, None
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
        ids, mask = tokenize_conversation(tok, messages, f"{filename}:{number}")
        if not any(mask):  # (the warning blamed max_length, and a file of only those told to raise it)
          raise FinetuneError(f"{filename}:{number} has no assistant answer to learn from or score (no assistant "
                              "message, or each has weight 0); drop the line or add the answer")
        conversations.append((ids, mask))
    # Packed, the train rows serve only to carve validation from (conversations longer than max_length stay
    # whole in the blocks, so their truncation as rows is no reason to warn or fail): the rows carved are checked
    # instead, as validation scores them (a carve of only long conversations scored nothing, and failed after
    # training).
    packed_train = pack and split == "train"
    if not conversations:  # (packed, it was blamed on max_length)
      raise FinetuneError(f"{filename} holds no conversation; fill it in or point the option at another file")
    splits[split] = _rows(conversations, max_length, pad_id, filename, check=not packed_train)
    if packed_train:
      train_from_rows = functools.partial(_packed, conversations, max_length, filename)
      check_validation_rows = functools.partial(_check_carved, conversations, max_length, pad_id, filename)
  return Dataset(os.path.basename(train_file).split(".")[0], splits, (), train_from_rows, check_validation_rows)


def _check_carved(conversations: list[tuple[list[int], list[int]]], max_length: int, pad_id: int, filename: str,
                  rows: np.ndarray) -> None:
  """The conversations carved into validation from a packed train file, checked as rows (`_rows`' check)."""
  _rows([conversations[row] for row in rows], max_length, pad_id,
        f"{filename} (the conversations config.data.validation_fraction carves into validation)")


def _packed(all_conversations: list[tuple[list[int], list[int]]], max_length: int, filename: str,
            rows: np.ndarray) -> ArraySplit:
  """Conversations `rows` as one stream cut into full blocks (the tail shorter than a block is dropped)."""
  conversations = [all_conversations[row] for row in rows]
  ids = [t for conversation, _ in conversations for t in conversation]
  mask = [m for _, conversation_mask in conversations for m in conversation_mask]
  conversation = [number for number, (tokens, _) in enumerate(conversations) for _ in tokens]
  blocks = len(ids) // max_length
  if not blocks:
    raise FinetuneError(f"{filename}: the training conversations hold {len(ids)} tokens, fewer than one packed "
                        f"block of {max_length}; lower data.options.max_length or set pack=False")
  if not any(mask[:blocks * max_length]):
    raise FinetuneError(f"{filename}: the packed blocks hold no answer token")
  shape = (blocks, max_length)
  input_ids = np.asarray(ids[:blocks * max_length], np.int32).reshape(shape)  # (N * T,) -> (N, T)
  # The attention mask numbers each block's conversations 1, 2, ... (models attend within one, restart
  # positions and recurrent state at the next; see finetune/models/layers.py:causal_bias).
  conversation = np.asarray(conversation[:blocks * max_length], np.int32).reshape(shape)
  segments = conversation - conversation[:, :1] + 1
  return ArraySplit({"input_ids": input_ids, "attention_mask": segments,
                     "loss_mask": np.asarray(mask[:blocks * max_length], np.int32).reshape(shape)})


def _rows(conversations: list[tuple[list[int], list[int]]], max_length: int, pad_id: int, filename: str,
          check: bool = True) -> ArraySplit:
  """One conversation per row, truncated on the right and padded to max_length."""
  input_ids = np.full((len(conversations), max_length), pad_id, np.int32)
  attention = np.zeros_like(input_ids)
  loss_mask = np.zeros_like(input_ids)
  for row, (ids, mask) in enumerate(conversations):
    ids, mask = ids[:max_length], mask[:max_length]  # truncated on the right
    input_ids[row, :len(ids)] = ids
    attention[row, :len(ids)] = 1
    loss_mask[row, :len(ids)] = mask
  # A conversation whose answers all lie beyond max_length teaches nothing (and a split of only those would train
  # on a zero loss); the loss mask's first token is never predicted, hence [:, 1:].
  unanswered = int((loss_mask[:, 1:].sum(axis=1) == 0).sum())
  if check and unanswered == len(conversations):
    raise FinetuneError(f"{filename}: no conversation keeps an answer token within data.options.max_length="
                        f"{max_length}; raise max_length")
  if check and unanswered:
    print(f"finetune: {filename}: {unanswered} of {len(conversations)} conversations keep no answer token within "
          f"max_length={max_length} (truncated on the right); they add nothing", file=sys.stderr)
  return ArraySplit({"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask})
