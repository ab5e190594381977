"""Supervised fine-tuning smoke run: a Llama- (or GPT-2-) shaped causal LM on an instruction JSONL file.

Loss only on assistant tokens; Alpaca, ShareGPT or OpenAI-chat records (see finetune/data/instructions.py).
`checkpoint` is a Hugging Face checkpoint directory (config.json + safetensors + tokenizer files); `data` the JSONL.

    finetune train --config configs/llama_sft_smoke.py:checkpoint=DIR,data=FILE.jsonl --workdir /tmp/sft

tests/data/test_instructions.py builds a tiny random Llama offline and runs this config on a generated file
(loss falls within 12 steps).
"""

import os

from finetune.config import ConfigDict, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, checkpoint="", data="sft.jsonl", model="llama", steps=12, max_length=32)
  config = ConfigDict()
  config.task = "causal_lm"
  config.model = dict(name=args.model, hf_config=args.checkpoint)
  config.data = dict(name="instructions", path=os.path.dirname(args.data), batch_size=8, eval_batch_size=8,
                     validation_fraction=0.2, eval_splits=("validation",),
                     options=dict(train_file=os.path.basename(args.data), tokenizer=args.checkpoint,
                                  max_length=args.max_length))
  config.train = dict(steps=args.steps, log_every=4, checkpoint_every=0)
  config.optimizer = dict(learning_rate=3e-3)
  config.init_from = args.checkpoint
  return config
