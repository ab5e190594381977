"""Transfer strategies on CIFAR-10 with two disjoint class sets: pretrain on A = {airplane, automobile, bird, cat,
deer}, adapt to B = {dog, frog, horse, ship, truck} with 300 updates. Data from `../shared/data/cifar10`.

Same recipes as configs/mnist_strategies.py (finetune/recipes.py), one per run; all share one workdir and one
pretraining stage:

    finetune train --config configs/cifar10_strategies.py:variant=full --workdir /tmp/cifar10_strategies
    finetune train --config configs/cifar10_strategies.py:variant=frozen_n,n=1 --workdir /tmp/cifar10_strategies
    ... (linear_probe, discriminative, gradual, chain_thaw, probe_then_finetune, ulmfit)

Measured test accuracy on B (5,000 official test images; 2 CPU cores; pretrain on A: test accuracy 0.7874):
  full 0.8398 | linear_probe 0.7840 (closed-form ridge 0.7830, logistic 0.7914) | frozen_n: n=1 0.8502,
  n=2 0.8368, n=3 0.8134 | discriminative 0.8090 | gradual 0.8350 | chain_thaw 0.7532 |
  probe_then_finetune 0.8786 | ulmfit 0.8088.
As on MNIST, a converged head first helps most; here freezing the stem even beats full fine-tuning (less
overfitting of 25,000 images in 300 steps), and general early features transfer between disjoint class sets.
"""

from finetune import recipes
from finetune.config import ConfigDict, parse_arg

CLASSES_A = ("airplane", "automobile", "bird", "cat", "deer")
CLASSES_B = ("dog", "frog", "horse", "ship", "truck")


def get_config(arg=None):
  args = parse_arg(arg, variant="full", n=2, steps=800, target_steps=300, data_path="../shared/data/cifar10")
  config = ConfigDict()
  config.model = dict(name="cnn", in_channels=3, stem_width=32, widths=(32, 64, 128), blocks_per_stage=1)
  config.data = dict(name="cifar10", path=args.data_path, batch_size=128, eval_batch_size=500,
                     validation_fraction=0.1)
  config.train = dict(steps=args.steps, log_every=50, checkpoint_every=200)
  config.optimizer = dict(name="adamw", learning_rate=3e-3, warmup_steps=30, weight_decay=5e-4, grad_clip_norm=1.0)
  config.stages = ConfigDict()
  config.stages.pretrain = dict(data=dict(classes=CLASSES_A))
  target = dict(data=dict(classes=CLASSES_B), train=dict(steps=args.target_steps), init_from="stage:pretrain",
                dont_load=(r"^head/",))
  # 5 groups (stem, stage_1..3, head): gradual unfreezing reaches all of them by 4/5 of the target steps.
  every = args.target_steps // (5 if args.variant in ("gradual", "ulmfit") else 6)
  for name, stage in recipes.target_stages(args.variant, target, n=args.n, unfreeze_every=every,
                                           probe_steps=10 * args.target_steps).items():
    config.stages[name] = stage
  return config
