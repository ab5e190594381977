"""Yosinski et al. 2014, "How transferable are features in deep neural networks?" (NeurIPS), on CIFAR-10.

Two base networks are trained from scratch, baseA on the classes of A and baseB on those of B. Then, for every
n = 1..N (N = the model's layer groups below the head, in order: for the CNN `stem, stage_1, ...`), four
transfer networks are trained on B, each a stage of this file:

    BnB_<n>       first n groups copied from baseB and frozen, the groups above and a new head re-initialised
    BnB_plus_<n>  (the paper's BnB+) the same, but nothing frozen: every group fine-tuned on B
    AnB_<n>       first n groups copied from baseA and frozen, the rest re-initialised, trained on B
    AnB_plus_<n>  (the paper's AnB+) first n groups copied from baseA, every group fine-tuned on B

In config terms: `init_from="stage:baseA"` or `"stage:baseB"`; `dont_load` = the regexes of the model's own
layer groups n+1..N plus the head's (taken from `layer_groups()` of the configured model, so each matches);
`freeze.first_n=n` for BnB/AnB (it freezes the first n layer groups in the same order, i.e. exactly the copied
ones) and 0 for the + variants. The paper's "n" counts layers; here a layer is a layer group (for the CNN with
one block per stage, one 3x3 conv + BatchNorm each). See experiments/yosinski/README.md.

Splits (`:split=`): `random` (default), 5 vs 5 classes drawn by `:split_seed` (a fixed permutation of the 10
classes from numpy's default_rng(split_seed): A = the first five, B = the rest, each in class-index order), or
`manmade`: A = airplane, automobile, ship, truck (4 classes) and B = the six animals (the paper's man-made vs
natural split of ImageNet). Data: `../shared/data/cifar10` (`:data_path=`); every stage is evaluated on B's (or,
for baseA, A's) official test images.

Scales (`:scale=`): `reduced` (default; N = 4, 500 steps of 64 per network, sized for 2 CPU cores: measured
10-13.5 minutes per run and 33 minutes for its 3-point sweep on an idle host, see the README), `full`
(N = 5 with a wider CNN, 4,000 steps of 128 per network, 18 points: for a GPU), `tiny` (tests; about a minute
a point on 2 CPU cores, mostly compiling).
`:steps=` (base networks) and `:target_steps=` (each transfer network) override the scale's step counts, `:ns=`
the n values (`+`-separated, e.g. `ns=1+3`; default all of 1..N).

Seeds: `--config.seed=K` (the sweep's seed axis). baseA runs with seed K, baseB with K + 500 and the transfer
networks with K + 1000 (`seed_offset`): the two bases start from different random weights (with one seed, the
lower layers AnB copies from baseA were near copies of those BnB copies from baseB), and the re-initialised groups
of a transfer network do not start from the very values its base network started from (the paper re-initialised
them randomly).

Single run (one split, one seed; all 2 + 4N stages in one workdir, re-running resumes):

    finetune train --config configs/cifar10_yosinski.py:scale=reduced,split=random,split_seed=0 \
      --workdir /tmp/yosinski/random0
    finetune train --config configs/cifar10_yosinski.py:scale=reduced,split=manmade --workdir /tmp/yosinski/manmade

The sweep (get_sweep below; results.csv + results.md averaged over the seed axis), then Figure 2:

    finetune sweep --config configs/cifar10_yosinski.py:scale=reduced --workdir /tmp/yosinski_sweep \
      --metric test/accuracy
    python experiments/yosinski/plot.py /tmp/yosinski_sweep/results.csv /tmp/yosinski_sweep/figure2.png
    (on a GPU: the same with scale=full)

Expected result: the paper's shape, i.e. AnB falls as n grows (later layers are more specific to A), BnB dips
for middle n (fragile co-adaptation between neighbouring layers that re-training the upper ones cannot
recover) and recovers at large n, BnB+ stays at baseB, and AnB+ is at or above baseB for every n (transferred
features help even after fine-tuning). Measured (reduced sweep, 2 CPU cores, 33 min for one seed per split on an
idle host; experiments/yosinski/README.md has the table, 3 seeds per split): AnB falls with n on every split
(n = 4, seed means: 0.57 vs BnB 0.79, 0.54 vs 0.68, man-made 0.37 vs 0.57); AnB+ >= baseB for every n, but not
clearly above the BnB+ control (0.006-0.007 above at n = 1, 2 on random split 0, level on split 1, below on the
man-made split from n = 2 and at n = 4 everywhere), so its lead over baseB is consistent with longer training rather than with features
from A; BnB shows no middle dip at this scale, and BnB+ > baseB (the 500-step bases are not converged).
"""

from __future__ import annotations

import numpy as np

from finetune.config import ConfigDict, parse_arg, refuse_unread
from finetune.errors import FinetuneError
from finetune.sweep import parse_sweep_arg, product, seeds

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MANMADE = ("airplane", "automobile", "ship", "truck")
NATURAL = ("bird", "cat", "deer", "dog", "frog", "horse")
SPLITS = ("random", "manmade")
# Offsets of baseB's and the transfer networks' seeds from baseA's (see the module docstring): every network starts
# from its own random weights, as in the paper.
BASE_B_SEED_OFFSET = 500
TRANSFER_SEED_OFFSET = 1000

# Per scale: the model, batch size, step counts, evaluated splits and default n values (None: all of 1..N).
# Transfer networks train as many steps as the base networks, as in the paper (each a fresh cosine schedule).
SCALES = {
    # 2 CPU cores: N = 4 (stem, stage_1..3), 2 bases + 16 transfer networks per point, ~16 min per point.
    "reduced": dict(model=dict(name="cnn", in_channels=3, stem_width=16, widths=(32, 64, 64), blocks_per_stage=1),
                    batch_size=64, steps=500, target_steps=500, eval_splits=("test",), ns=None),
    # A GPU: N = 5 (stem, stage_1..4), 2 bases + 20 transfer networks per point.
    "full": dict(model=dict(name="cnn", in_channels=3, stem_width=64, widths=(64, 128, 256, 512),
                            blocks_per_stage=1),
                 batch_size=128, steps=4000, target_steps=4000, eval_splits=("validation", "test"), ns=None),
    # Tests: about a minute a point on 2 CPU cores, mostly compiling. N = 3 (stem, stage_1, stage_2).
    "tiny": dict(model=dict(name="cnn", in_channels=3, stem_width=4, widths=(4, 8), blocks_per_stage=1),
                 batch_size=16, steps=2, target_steps=2, eval_splits=("test",), ns=None),
}

ARGS = dict(scale="reduced", split="random", split_seed=0, steps=0, target_steps=0, ns="",
            data_path="../shared/data/cifar10")


def class_split(split: str, split_seed: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(classes of A, classes of B) by name, each in CIFAR-10 class-index order."""
  if split == "manmade":
    return MANMADE, NATURAL
  if split != "random":
    raise FinetuneError(f"unknown :split={split!r}; valid: {', '.join(SPLITS)}")
  if split_seed < 0:
    raise FinetuneError(f":split_seed must be >= 0, got {split_seed}")
  order = np.random.default_rng(split_seed).permutation(len(CLASS_NAMES))
  return (tuple(CLASS_NAMES[i] for i in sorted(order[:5])), tuple(CLASS_NAMES[i] for i in sorted(order[5:])))


def transfer_groups(model: dict) -> tuple[list[tuple[str, str]], str]:
  """([(name, regex)] of the transferable layer groups in order, the head's regex), from the model's own
  `layer_groups()` (built from shapes only)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top  (config files import jax lazily)
  from finetune.models import build_model  # pylint: disable=g-import-not-at-top

  groups = nnx.eval_shape(lambda: build_model(ConfigDict(model), 2, nnx.Rngs(0))).layer_groups()
  *lower, (head_name, head_regex) = groups
  if head_name != "head" or not lower:
    raise FinetuneError(f"model {model['name']!r} has layer groups {[g for g, _ in groups]}; the Yosinski "
                        "experiment needs transferable groups followed by the head")
  return lower, head_regex


def parse_ns(text: str, num_groups: int, default: list[int] | None) -> list[int]:
  if not text or text == "all":
    return default or list(range(1, num_groups + 1))
  try:
    ns = [int(part) for part in str(text).split("+")]
  except ValueError:
    raise FinetuneError(f":ns={text!r} is not '+'-separated integers such as 1+3") from None
  bad = [n for n in ns if not 1 <= n <= num_groups]
  if bad or len(set(ns)) != len(ns):
    raise FinetuneError(f":ns={text!r}: need distinct values in 1..{num_groups} (the model's transferable layer "
                        "groups)")
  return sorted(ns)


def condition_stages(groups: list[tuple[str, str]], head_regex: str, n: int, classes_b: tuple[str, ...],
                     steps: int) -> dict[str, dict]:
  """The four transfer networks at n, {stage name: overrides}: BnB_n, BnB_plus_n, AnB_n, AnB_plus_n."""
  dont_load = tuple(regex for _, regex in groups[n:]) + (head_regex,)  # groups n+1..N and the head: fresh
  stages = {}
  for source in ("B", "A"):
    for plus in (False, True):
      stages[f"{source}nB_plus_{n}" if plus else f"{source}nB_{n}"] = dict(
          data=dict(classes=classes_b), init_from=f"stage:base{source}", dont_load=dont_load,
          freeze=dict(first_n=0 if plus else n), seed_offset=TRANSFER_SEED_OFFSET,
          # (evaluate_sources off: the source task's accuracy after transfer is not part of this experiment)
          train=dict(steps=steps, evaluate_sources=False), optimizer=dict(warmup_steps=min(30, steps // 10)))
  return stages


def get_config(arg=None):
  args = parse_arg(arg, **ARGS)
  refuse_unread(arg, ("split_seed",) if args.split != "random" else (), f"split={args.split!r} (a fixed split)")
  if args.scale not in SCALES:
    raise FinetuneError(f"unknown :scale={args.scale!r}; valid: {', '.join(SCALES)}")
  scale = SCALES[args.scale]
  classes_a, classes_b = class_split(args.split, args.split_seed)
  groups, head_regex = transfer_groups(scale["model"])
  ns = parse_ns(args.ns, len(groups), scale["ns"])
  steps, target_steps = args.steps or scale["steps"], args.target_steps or scale["target_steps"]

  config = ConfigDict()
  config.model = dict(scale["model"])
  config.data = dict(name="cifar10", path=args.data_path, batch_size=scale["batch_size"], eval_batch_size=500,
                     validation_fraction=0.1, eval_splits=scale["eval_splits"], augment=dict(flip=True))
  # Checkpoints only at the end on CPU (each is read once, by the transfer networks); every 1000 steps on a GPU.
  config.train = dict(steps=steps, log_every=50, checkpoint_every=1000 if args.scale == "full" else 0,
                      keep_checkpoints=1)
  config.optimizer = dict(name="adamw", learning_rate=3e-3, warmup_steps=min(30, steps // 10), weight_decay=5e-4,
                          grad_clip_norm=1.0)
  config.stages = ConfigDict()
  config.stages.baseA = dict(data=dict(classes=classes_a))
  # (Until 2026-12-07 baseB shared baseA's seed: the two bases started from the same weights, so the lower layers
  # AnB copies from baseA were near copies of those BnB copies from baseB; cosine 0.98 in the stem after training.)
  config.stages.baseB = dict(data=dict(classes=classes_b), seed_offset=BASE_B_SEED_OFFSET)
  for n in ns:
    for name, stage in condition_stages(groups, head_regex, n, classes_b, target_steps).items():
      config.stages[name] = stage
  return config


def get_sweep(arg=None):
  """The points: random 5/5 splits (`split_seed`) and the man-made vs natural split, times seeds (`seed`).
  `reduced`: split seeds 0, 1 and manmade, seed 0 (3 points); `full`: split seeds 0..4 and manmade, seeds 0..2
  (18 points). `:seeds=3` (a count) or `:seeds=(1,2)` (the values) overrides the scale's seeds. Every point runs
  all 2 + 4N stages; the command line's other `:arg` items (scale, steps, ...) apply to all.

      finetune sweep --config configs/cifar10_yosinski.py:scale=reduced --workdir /tmp/yosinski_sweep \
        --metric test/accuracy
  """
  args = parse_sweep_arg(arg, own=dict(seeds=None), **ARGS)
  split_seeds, num_seeds = ((0, 1), 1) if args.scale in ("reduced", "tiny") else ((0, 1, 2, 3, 4), 3)
  splits = [{":split": "random", ":split_seed": s} for s in split_seeds] + [{":split": "manmade"}]
  return product(splits, seeds(args.seeds, default=num_seeds))
