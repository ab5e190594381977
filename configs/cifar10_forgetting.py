"""Catastrophic forgetting on CIFAR-10 with two disjoint class sets (`../shared/data/cifar10`): pretrain on
A = {airplane, automobile, bird, cat, deer}, fine-tune on B = {dog, frog, horse, ship, truck} with a new head, and
measure what task A lost, for plain fine-tuning and each forgetting regularizer (finetune/recipes.py:
forgetting_stages; see configs/mnist_forgetting.py for the variants).

    finetune train --config configs/cifar10_forgetting.py --workdir /tmp/cifar10_forgetting
    finetune train --config configs/cifar10_forgetting.py:variant=lwf,lwf_weight=0.3 --workdir /tmp/cifar10_lwf03

Measured (2 CPU cores, seed 0; official test images of each class set; task A at 0.7856 after pretraining; all
variants in about 16 minutes on an idle machine), target accuracy on B / accuracy on A after fine-tuning:
  finetune 0.8432 / 0.0664 | ewc (lambda 100) 0.7698 / 0.6278 | l2sp (alpha 0.1) 0.7728 / 0.2972 |
  lwf (w 1) 0.8394 / 0.7670 | rehearsal (25%) 0.8182 / 0.7654 (rerun with `:variant=rehearsal` on 2026-12-06,
  after commit 8bf03cf gave rehearsal's source order a random stream of its own; before the rehearsal fix of
  commit 61ac2c7, 0.6764 on B: experiments/forgetting/README.md; ewc rerun the same way that day with
  `:variant=ewc` after commit 018f3a0 changed the Fisher program's rounding; l2sp rerun on 2026-12-07 with
  `:variant=l2sp` after commit 24ebc35 kept beta off the head's bias, from a pretrain run giving 0.7846)
(the middle point of get_sweep's run of 2026-11-30, experiments/forgetting/cifar10_results.csv: the finetune
and lwf rows and task A's 0.7856 are from that run, before commit 61ac2c7 changed the order in which a batch's
rows are summed; the same pretrain and finetune stages at HEAD gave 0.7858 and 0.8442 (configs/cifar10_strategies.py,
variant=full, 2026-12-03), and the ewc and rehearsal reruns started from that 0.7858. A run of 2026-11-28 on another
machine gave each number within 0.01 of these.) Plain fine-tuning leaves task A below chance
(its head reads features that now mean B's classes); LwF keeps A almost intact for 0.004 of B (0.008 over 3 seeds).

Arguments: `variant` (all, finetune, ewc, l2sp, lwf, rehearsal), `steps` / `target_steps` (the pretraining and each
variant's updates), `ewc_weight`, `l2sp_alpha`, `lwf_weight`, `rehearsal_fraction` (a variant reads its own),
`data_path`; `get_sweep` also `seeds` (its strengths are the points').
"""

from finetune.config import ConfigDict, parse_arg, refuse_unread
from finetune.recipes import forgetting_stages, forgetting_unread
from finetune.sweep import parse_sweep_arg, product, seeds, zipped

# The trade-off sweep's strengths, weakest to strongest, one point per column (each point pretrains once and
# runs plain fine-tuning and every regularizer at that column's strength). The middle column is get_config's
# default; the others are a step weaker and stronger (a factor 10, or 3 for LwF, 2 for rehearsal).
STRENGTHS = {
    ":ewc_weight": [10.0, 100.0, 1000.0],
    ":l2sp_alpha": [0.01, 0.1, 1.0],
    ":lwf_weight": [0.3, 1.0, 3.0],
    ":rehearsal_fraction": [0.125, 0.25, 0.5],
}

CLASSES_A = ("airplane", "automobile", "bird", "cat", "deer")
CLASSES_B = ("dog", "frog", "horse", "ship", "truck")


ARGS = dict(variant="all", steps=800, target_steps=300, ewc_weight=100.0, l2sp_alpha=0.1, lwf_weight=1.0,
            rehearsal_fraction=0.25, data_path="../shared/data/cifar10")


def get_config(arg=None):
  args = parse_arg(arg, **ARGS)
  refuse_unread(arg, forgetting_unread(args.variant), f"variant={args.variant!r}")
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
  for name, stage in forgetting_stages(args.variant, target, ewc_weight=args.ewc_weight, l2sp_alpha=args.l2sp_alpha,
                                       lwf_weight=args.lwf_weight,
                                       rehearsal_fraction=args.rehearsal_fraction).items():
    config.stages[name] = stage
  return config


def get_sweep(arg=None):
  """The CIFAR-10 forgetting trade-off: every regularizer at 3 strengths (STRENGTHS, zipped) x `:seeds=` seeds
  (a count or the values, e.g. `(1,2)`; default 1: a point takes 16 to ~40 minutes on the development machines'
  2 CPU cores; with more seeds the plot and results.md show the spread). Measured with seeds 0-2 at every strength
  (plain fine-tuning over 4 runs: seed 1 ran twice, on two hosts): the table and plot in
  experiments/forgetting/README.md.

      finetune sweep --config configs/cifar10_forgetting.py --workdir /tmp/cifar10_forgetting_sweep \
        --metric test/accuracy --metric forgetting/pretrain/test/after
      python experiments/forgetting/plot.py /tmp/cifar10_forgetting_sweep/results.csv cifar10_tradeoff.png
  """
  args = parse_sweep_arg(arg, own=dict(seeds=None), **ARGS)  # the strengths are the points'; the rest reach them
  unread = forgetting_unread(args.variant)  # `:variant=ewc` sweeps EWC's strength alone
  strengths = {key: values for key, values in STRENGTHS.items() if key[1:] not in unread}
  return product(zipped(strengths), seeds(args.seeds, default=1))
