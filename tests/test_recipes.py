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
  assert staged["probe"]["features"] == {"cache": True} and staged["probe"]["train"] == {"steps": 50}
  assert staged["probe_then_finetune"]["init_from"] == "stage:probe"
  assert "dont_load" not in staged["probe_then_finetune"]  # the probe already has the new head
  qlora = recipes.target_stages("qlora", TARGET, lora={"targets": ("query",)}, lora_lr=2e-3)["qlora"]
  assert qlora["peft"]["quantize"] == "nf4" and qlora["peft"]["targets"] == ("query",) and not qlora["peft"]["dora"]
  assert qlora["optimizer"]["learning_rate"] == 2e-3
  assert recipes.target_stages("dora", TARGET)["dora"]["peft"]["dora"]
  with pytest.raises(FinetuneError, match="unknown recipe 'lorra'"):
    recipes.target_stages("lorra", TARGET)


@pytest.mark.parametrize("config_file", ["mnist_strategies.py", "cifar10_strategies.py"])
@pytest.mark.parametrize("variant", recipes.RECIPES)
def test_every_variant_of_the_strategy_configs_validates(config_file, variant):
  config = load_config(f"{REPO / 'configs' / config_file}:variant={variant}")
  names = [name for name, _ in stage_configs(config)]
  assert names[0] == "pretrain" and len(names) in (2, 3)
