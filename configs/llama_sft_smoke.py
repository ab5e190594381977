"""Supervised fine-tuning smoke run: a Llama- (or GPT-2-) shaped causal LM on an instruction JSONL file.

Loss only on assistant tokens; Alpaca, ShareGPT or OpenAI-chat records (see finetune/data/instructions.py).
`checkpoint` is a Hugging Face checkpoint directory (config.json + safetensors + tokenizer files); `data` the JSONL.

    finetune train --config configs/llama_sft_smoke.py:checkpoint=DIR,data=FILE.jsonl --workdir /tmp/sft
    finetune train --config configs/llama_sft_smoke.py:checkpoint=DIR,data=FILE.jsonl,peft=lora --workdir /tmp/sft_lora

Qwen2 / Qwen2.5, Qwen3, Mistral, Ministral and Gemma 1-3 (text) checkpoints run as they are (our Llama reads
them); a GPT-2 checkpoint needs `:model=gpt2` as well (the default is `llama`); `steps` and `max_length` set the
run's length and the token budget per row. `peft=lora` (or `qlora`) trains rank-8 LoRA adapters on the attention
projections (Llama: q_proj, v_proj; GPT-2: its fused c_attn) with the base frozen; `finetune export --format peft`
then writes the PEFT adapter. `pack=True` concatenates the training conversations into full `max_length` blocks,
each conversation attending only to itself.

Expected result: no real Llama or GPT-2 checkpoint installs offline here, so this config was measured on what
tests/data/test_instructions.py builds: a random 2-layer Llama (hidden 32) with MiniLM's tokenizer and a generated
file of 44 unique conversations (9 held out). Over the 12 steps the logged training loss went 10.14 -> 9.65 -> 9.41
(full fine-tuning; validation loss 9.65, next-token accuracy 0.43 on the 23 response tokens) and 10.31 -> 10.23 ->
10.19 with `peft=lora` (validation loss 10.22), on 2 CPU cores, 2026-12-03. The test asserts the loss falls for
Llama with full fine-tuning and QLoRA, and GPT-2 with LoRA and with packed full fine-tuning.
"""

import os

from finetune.config import ConfigDict, parse_arg
from finetune.errors import FinetuneError
from finetune.models import hf


def get_config(arg=None):
  args = parse_arg(arg, checkpoint="", data="sft.jsonl", model="llama", steps=12, max_length=32, peft="",
                    pack=False)
  if not args.checkpoint:  # (the tokenizer, the model's shape and its weights all come from it)
    raise FinetuneError("configs/llama_sft_smoke.py needs :checkpoint=DIR, a Hugging Face checkpoint folder "
                        "(config.json, tokenizer files, model.safetensors); see this file's docstring")
  hf.require_checkpoint_dir(args.checkpoint, ":checkpoint")
  config = ConfigDict()
  config.task = "causal_lm"
  config.model = dict(name=args.model, hf_config=args.checkpoint)
  config.data = dict(name="instructions", path=os.path.dirname(args.data), batch_size=8, eval_batch_size=8,
                     validation_fraction=0.2, eval_splits=("validation",),
                     options=dict(train_file=os.path.basename(args.data), tokenizer=args.checkpoint,
                                  max_length=args.max_length, pack=args.pack))
  config.train = dict(steps=args.steps, log_every=4, checkpoint_every=0)
  config.optimizer = dict(learning_rate=3e-3)
  config.init_from = args.checkpoint
  if args.peft not in ("", "lora", "qlora"):
    raise FinetuneError(f"peft={args.peft!r}; valid: lora, qlora (or leave it out for full fine-tuning)")
  if args.peft:
    targets = ("c_attn",) if args.model == "gpt2" else ("q_proj", "v_proj")
    config.peft = dict(method="lora", targets=targets, rank=8, alpha=16.0,
                       quantize="nf4" if args.peft == "qlora" else "", quant_block_size=32)
  return config
