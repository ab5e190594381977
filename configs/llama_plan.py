"""Llama-shaped models at 1B and 7B scale on synthetic tokens: for `finetune plan` (memory and FLOPs of the train
step before anything is allocated), full fine-tuning or LoRA.

    finetune plan --config configs/llama_plan.py:size=1b,peft=lora --devices 8 --mesh fsdp=8
    finetune plan --config configs/llama_plan.py:size=7b --devices 8 --mesh fsdp=8

Expected result (2026-12-03, 2 CPU cores standing in for 8 devices; per device, float32, batch 8 x 512 tokens):
    size=1b,peft=lora: 1,112,664,064 params, 12,615,680 trainable (1.13%); params 0.543 GiB, optimizer state
    0.061 GiB, arguments 0.604 GiB (exact on any machine); temporaries 7.965 GiB and 2.302 TFLOP per step (the
    CPU compiler's, which vary with the host). size=7b on fsdp=8: params 3.139 GiB, optimizer state 6.277 GiB.
    All four rows: README, "Planning a run before it exists".

Shapes: 1b = TinyLlama-1.1B (hidden 2048, MLP 5632, 22 layers, 32 heads, 4 key/value heads); 7b = Llama-2-7B
(hidden 4096, MLP 11008, 32 layers, 32 heads). `peft=lora`: r=16 on every projection; `qlora` adds NF4 storage.
Other arguments: `batch_size` (8), `length` (512 tokens), `layers` (0: the size's own count).
"""

from finetune.config import ConfigDict, parse_arg
from finetune.errors import FinetuneError

SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
}


def get_config(arg=None):
  args = parse_arg(arg, size="1b", peft="", batch_size=8, length=512, layers=0)
  if args.size not in SIZES:
    raise FinetuneError(f"size={args.size!r}; valid: {', '.join(SIZES)}")
  config = ConfigDict()
  config.task = "causal_lm"
  shape = dict(SIZES[args.size], **({"num_hidden_layers": args.layers} if args.layers else {}))
  config.model = dict(name="llama", vocab_size=32000, **shape)
  config.data = dict(name="synthetic", batch_size=args.batch_size, eval_batch_size=args.batch_size,
                     validation_fraction=0.0, eval_splits=("test",),
                     # (enough rows for any --config.data.batch_size a larger mesh needs: only shapes matter)
                     options=dict(kind="tokens", length=args.length, vocab_size=32000,
                                  num_examples=max(args.batch_size, 1024)))
  config.train = dict(steps=1000)
  config.optimizer = dict(name="adamw", learning_rate=1e-4)
  if args.peft not in ("", "lora", "qlora"):
    raise FinetuneError(f"peft={args.peft!r}; valid: lora, qlora (or leave it out for full fine-tuning)")
  if args.peft:
    config.peft = dict(method="lora", rank=16, alpha=32.0, quantize="nf4" if args.peft == "qlora" else "",
                       targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
  return config
