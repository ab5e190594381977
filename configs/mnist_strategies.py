"""Transfer strategies on the MNIST split task: pretrain on digits 0-4, then adapt to digits 5-9 with 100 updates.

One variant per run, chosen by `:variant=...`; every variant's target stage is named after it, so all variants can
share one --workdir and pretrain only once (a finished stage is never re-run):

    finetune train --config configs/mnist_strategies.py:variant=full --workdir /tmp/mnist_strategies
    finetune train --config configs/mnist_strategies.py:variant=linear_probe --workdir /tmp/mnist_strategies
    finetune train --config configs/mnist_strategies.py:variant=frozen_n,n=2 --workdir /tmp/mnist_strategies
    ... (discriminative, gradual, chain_thaw, probe_then_finetune, ulmfit)

Variants (layer groups of the CNN, input to output: stem, stage_1, stage_2, head):
  full                 every parameter trains (the main job's 'finetune' stage)
  linear_probe         backbone frozen, head trained on cached features (2,000 steps); ridge, logistic probes
  frozen_n             Yosinski's frozen-n: the first n groups frozen (`n`, default 2), the rest fine-tuned
  discriminative       ULMFiT's discriminative rates: lr / 2.6^(3 - i) for group i
  gradual              gradual unfreezing: head first, one more group every 25 steps
  chain_thaw           head, then each group alone from the input up, then all (20 steps each)
  probe_then_finetune  a head-only stage (cached features, 2,000 steps), then full fine-tuning from it
  ulmfit               discriminative rates + slanted triangular schedule + gradual unfreezing

Measured test accuracy on digits 5-9 (4,861 official test images; 2 CPU cores, 2026-12-03, commit a6a6f4c;
pretrain 0-4 test 0.9778):
  full 0.9331 | linear_probe 0.8301 (closed-form ridge 0.8932, logistic 0.9105) | frozen_n: n=1 0.9327,
  n=2 0.8722, n=3 0.4602 | discriminative 0.8690 | gradual 0.9039 | chain_thaw 0.7914 |
  probe_then_finetune 0.9601 | ulmfit 0.7928.
At this small budget, a converged head before fine-tuning helps most; freezing the first group costs little and
freezing deeper groups more (features become specific, as in Yosinski et al.); schemes that hold most groups back
for most of the 100 steps (chain-thaw, ULMFiT's combination) lose. Every run is deterministic (seed 0).

Arguments: `variant` (a recipe of finetune/recipes.py), `n` (frozen_n's groups), `steps` / `target_steps` (the
pretraining and target stages' updates), `data_path` ('auto': the shared official test files when present).
"""

from finetune import recipes
from finetune.config import ConfigDict, parse_arg, refuse_unread
from finetune.data import mnist
from finetune.errors import FinetuneError


def get_config(arg=None):
  args = parse_arg(arg, variant="full", n=2, steps=300, target_steps=100, data_path="auto")
  refuse_unread(arg, ("n",) if args.variant != "frozen_n" else (), f"variant={args.variant!r} (n is frozen_n's)")
  if args.variant in recipes.PEFT_RECIPES:  # (the recipe list offers them; the CNN's only Linear layer is its head)
    raise FinetuneError(f"variant {args.variant!r} adapts Linear layers, and this CNN has none but its head; the LoRA "
                        f"family runs in configs/minilm_sst2.py. Variants here: {', '.join(recipes.RECIPES)}")
  data_path = mnist.resolve_path(args.data_path)  # 'auto': the shared test files when present
  config = ConfigDict()
  config.model = dict(name="cnn", in_channels=1, stem_width=32, widths=(32, 64), blocks_per_stage=1)
  config.data = dict(name="mnist", path=data_path, batch_size=64, eval_batch_size=500,
                     eval_splits=("validation", "test") if data_path else ("validation",))
  config.train = dict(steps=args.steps, log_every=25, checkpoint_every=100)
  config.optimizer = dict(name="adamw", learning_rate=3e-3, warmup_steps=20, weight_decay=1e-4, grad_clip_norm=1.0)
  config.stages = ConfigDict()
  config.stages.pretrain = dict(data=dict(classes=(0, 1, 2, 3, 4)))
  target = dict(data=dict(classes=(5, 6, 7, 8, 9)), train=dict(steps=args.target_steps),
                init_from="stage:pretrain", dont_load=(r"^head/",))
  # 4 groups unfreeze over the first 100 steps (gradual: every 25; chain-thaw: 5 phases of 20).
  every = max(1, args.target_steps // (4 if args.variant == "gradual" or args.variant == "ulmfit" else 5))  # (0 for a shortened run: refused as 'no unfreezing interval')
  stages = recipes.target_stages(args.variant, target, n=args.n, unfreeze_every=every,
                                 probe_steps=20 * args.target_steps)
  for name, stage in stages.items():
    config.stages[name] = stage
  return config
