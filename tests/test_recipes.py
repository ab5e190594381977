"""Named recipes expand to the strategy settings they stand for, and every recipe's config validates."""

from __future__ import annotations

import pytest

from conftest import REPO
from finetune import recipes
from finetune.config import load_config, stage_configs
from finetune.errors import FinetuneError

TARGET = {"data": {"classes": (5, 6)}, "train": {"steps": 10}, "init_from": "stage:pretrain",
          "dont_load": ("^head/",)}


def test_recipes_expand_to_their_settings():
  assert recipes.target_stages("full", TARGET) == {"full": TARGET}
  assert recipes.target_stages("frozen_n", TARGET, n=3)["frozen_3"]["freeze"] == {"first_n": 3}
  gradual = recipes.target_stages("gradual", TARGET, unfreeze_every=4)["gradual"]
  assert gradual["unfreeze"] == {"mode": "gradual", "every_steps": 4}
  ulmfit = recipes.target_stages("ulmfit", TARGET)["ulmfit"]
  assert ulmfit["optimizer"]["lr_factor"] == 2.6 and ulmfit["optimizer"]["schedule"] == "stlr"
  staged = recipes.target_stages("probe_then_finetune", TARGET, probe_steps=50)
  assert list(staged) == ["probe", "probe_then_finetune"]
  assert staged["probe"]["features"] == {"cache": True} and staged["probe"]["train"] == {"steps": 50, "epochs": 0.0}
  assert staged["probe_then_finetune"]["init_from"] == "stage:probe"
  assert "dont_load" not in staged["probe_then_finetune"]  # the probe already has the new head
  qlora = recipes.target_stages("qlora", TARGET, lora={"targets": ("query",)}, lora_lr=2e-3)["qlora"]
  assert qlora["peft"]["quantize"] == "nf4" and qlora["peft"]["targets"] == ("query",) and not qlora["peft"]["dora"]
  assert qlora["optimizer"]["learning_rate"] == 2e-3
  assert recipes.target_stages("dora", TARGET)["dora"]["peft"]["dora"]
  # (A LoRA recipe over a re-initialised head left it frozen at its initial weights: ViT's zero head learnt nothing.)
  assert qlora["peft"]["modules_to_save"] == ("^head/",)
  assert "modules_to_save" not in recipes.target_stages("lora", {"train": {"steps": 10}})["lora"]["peft"]
  assert recipes.target_stages("lora", TARGET, lora={"modules_to_save": ()})["lora"]["peft"]["modules_to_save"] == ()
  with pytest.raises(FinetuneError, match="unknown recipe 'lorra'"):
    recipes.target_stages("lorra", TARGET)
  # (lora={'dora': True} under 'qlora' was overwritten: plain QLoRA trained, exit 0.)
  with pytest.raises(FinetuneError, match=r"recipe 'qlora' decides config.peft.dora itself.*QLoRA with DoRA"):
    recipes.target_stages("qlora", TARGET, lora={"targets": ("query",), "dora": True})
  with pytest.raises(FinetuneError, match=r"recipe 'lora' decides config.peft.method, quantize itself"):
    recipes.target_stages("lora", TARGET, lora={"method": "ia3", "quantize": "nf4"})


@pytest.mark.parametrize("recipe", ["full", "frozen_n", "discriminative", "gradual", "chain_thaw", "ulmfit", "lora"])
def test_recipes_keep_the_target_stages_own_settings(recipe):
  """A recipe adds its keys to the target's sections: the stage still trains at the target's learning rate (not
  the pretraining stage's), and keeps its weight decay and train_bn (which PEFT refuses: it trains only what the
  method adds and modules_to_save names)."""
  from finetune.config import build_config  # pylint: disable=g-import-not-at-top
  train_bn = recipe != "lora"
  target = {**TARGET, "optimizer": {"learning_rate": 1e-4, "weight_decay": 0.0}, "freeze": {"train_bn": train_bn}}
  base = {"model": {"name": "mlp", "input_size": 64, "hidden": (16,)}, "data": {"name": "digits"},
          "train": {"steps": 5},
          "optimizer": {"learning_rate": 3e-3, "weight_decay": 1e-4}}
  stages = recipes.target_stages(recipe, target, lora={"targets": ("hidden_0",)}, lora_lr=1e-4)
  (_, _), (_, stage) = stage_configs(build_config({**base, "stages": {"pretrain": {}, **stages}}))
  assert (stage.optimizer.learning_rate, stage.optimizer.weight_decay, stage.freeze.train_bn) == (1e-4, 0.0, train_bn)


@pytest.mark.parametrize("recipe", ["linear_probe", "probe_then_finetune"])
def test_probe_stages_ignore_the_base_configs_epochs_freezing_and_unfreezing(recipe, tmp_path):
  """(A base config with train.epochs, freeze.train_bn, gradual unfreezing or augmentation made the probe stage
  invalid: its partial train/freeze sections let those keys back in.) A full fine-tuning stage beside the linear
  probe reads the base's unfreezing: settings no stage reads are refused (tests/test_config.py)."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from finetune import train as train_lib  # pylint: disable=g-import-not-at-top
  target = {"init_from": "stage:pretrain", "dont_load": ("^head/",), "train": {"epochs": 0.2}}
  config = tiny_config(train={"steps": 0, "epochs": 0.05, "log_every": 2, "checkpoint_every": 0},
                       freeze={"train_bn": True, "first_n": 1}, unfreeze={"mode": "gradual", "every_steps": 2},
                       data={"augment": {"flip": True}},
                       stages={"pretrain": {"freeze": {"train_bn": False, "first_n": 0}, "unfreeze": {"mode": "none"}},
                               **recipes.target_stages(recipe, target, probe_steps=4),
                               **(recipes.target_stages("full", target) if recipe == "linear_probe" else {})})
  summaries = train_lib.train_and_evaluate(config, str(tmp_path))
  probe = summaries["linear_probe" if recipe == "linear_probe" else "probe"]
  assert probe["steps"] == 4, probe["steps"]


@pytest.mark.parametrize("config_file", ["mnist_strategies.py", "cifar10_strategies.py"])
@pytest.mark.parametrize("variant", recipes.RECIPES)
def test_every_variant_of_the_strategy_configs_validates(config_file, variant):
  config = load_config(f"{REPO / 'configs' / config_file}:variant={variant}")
  names = [name for name, _ in stage_configs(config)]
  assert names[0] == "pretrain" and len(names) in (2, 3)
