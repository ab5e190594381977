"""CIFAR-10 from scratch, all ten classes: a standalone single-stage baseline (a wider CNN than the transfer
experiments' and with crop + flip augmentation; they train 5-class subsets, configs/cifar10_strategies.py).

Data: all of CIFAR-10 from `../shared/data/cifar10` (train.tar / test.tar of JPEGs; decoded once and cached under
`~/.cache/finetune`), 5,000 training images held out for validation, random crops (padding 4) and flips.

Command:
    finetune train --config configs/cifar10_cnn.py --workdir /tmp/cifar10_cnn

Expected result (seed 0, measured on 2 CPU cores shared with other work on 2026-11-28 at commit a7d2c5b: 14 minutes,
190 training examples/s; before commit 61ac2c7 changed the order in which a batch's rows are summed, which moved
other CIFAR-10 stages by up to 0.004, configs/cifar10_strategies.py; this docstring is that run's only record):
    test accuracy 0.7142, validation 0.7108.

Arguments: `steps` (default 1200), `data_path` (default '../shared/data/cifar10').
"""

from finetune.config import ConfigDict, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, steps=1200, data_path="../shared/data/cifar10")
  config = ConfigDict()
  config.model = dict(name="cnn", in_channels=3, stem_width=32, widths=(64, 128, 256), blocks_per_stage=1)
  config.data = dict(name="cifar10", path=args.data_path, batch_size=128, eval_batch_size=500,
                     validation_fraction=0.1, augment=dict(crop_padding=4, flip=True))
  config.train = dict(steps=args.steps, log_every=100, checkpoint_every=400, eval_every=400)
  config.optimizer = dict(name="adamw", learning_rate=3e-3, warmup_steps=50, weight_decay=5e-4,
                          grad_clip_norm=1.0)
  return config
