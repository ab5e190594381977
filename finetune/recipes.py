"""Named fine-tuning recipes: the stage overrides that turn a plain target stage into a strategy.

Experiment configs (`configs/*_strategies.py`) and sweeps compose them, so "gradual unfreezing" or "probe then
fine-tune" means the same settings in every experiment. `target_stages` returns {stage name: overrides}; the stage
names carry the recipe, so several recipes can share one workdir and its pretraining stage.
"""

from __future__ import annotations

import re
from typing import Any

from finetune.errors import FinetuneError

RECIPES = ("full", "linear_probe", "frozen_n", "discriminative", "gradual", "chain_thaw", "probe_then_finetune",
           "ulmfit")
# LoRA-family recipes: for models with dense layers to adapt (transformers); `lora` names the targets.
PEFT_RECIPES = ("lora", "dora", "qlora")
# Everything outside head/ frozen: the linear probe / frozen backbone. Every key is set: a stage's section replaces
# the target's, and the base config's own keys (first_n, train_bn) would come back under it.
PROBE_FREEZE = {"patterns": ("^(?!head/)",), "first_n": 0, "train_bn": False}


def target_stages(recipe: str, target: dict[str, Any], *, n: int = 2, unfreeze_every: int = 25,
                  probe_steps: int = 2000, probe_lr: float = 1e-2, lr_factor: float = 2.6,
                  lora: dict[str, Any] | None = None, lora_lr: float = 1e-3) -> dict[str, dict]:
  """The stages that adapt a pretrained model with `recipe`, given the plain target stage's overrides `target`
  (data, steps, init_from, dont_load, ...). LoRA recipes take `lora` (config.peft overrides: targets, rank, alpha,
  modules_to_save, ...) and their own learning rate: adapters train at rates ~10-100x full fine-tuning's; a head
  the target re-initialises is trained fully unless `lora` sets modules_to_save."""
  if recipe not in RECIPES + PEFT_RECIPES:
    raise FinetuneError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES + PEFT_RECIPES)}")
  # On cached features a head update costs microseconds, so probes get their own (long) budget.
  # (epochs and unfreezing set too, for the same reason: a base config's would make the probe invalid.)
  # Augmentation off too: features are computed once per example (a base config's augmentation would refuse it).
  probe = dict(target, freeze=PROBE_FREEZE, features={"cache": True}, train={"steps": probe_steps, "epochs": 0.0},
               unfreeze={"mode": "none"}, optimizer={"learning_rate": probe_lr, "warmup_steps": 0},
               data={**target.get("data", {}), "augment": {"crop_padding": 0, "flip": False}})
  if recipe == "full":
    return {"full": target}
  if recipe == "linear_probe":
    return {"linear_probe": dict(probe, features={"cache": True, "closed_form": ("ridge", "logistic")})}
  if recipe == "frozen_n":
    return {f"frozen_{n}": _merged(target, freeze={"first_n": n})}
  if recipe == "discriminative":
    return {"discriminative": _merged(target, optimizer={"lr_factor": lr_factor})}
  if recipe == "gradual":
    return {"gradual": _merged(target, unfreeze={"mode": "gradual", "every_steps": unfreeze_every})}
  if recipe == "chain_thaw":
    return {"chain_thaw": _merged(target, unfreeze={"mode": "chain_thaw", "every_steps": unfreeze_every})}
  if recipe == "probe_then_finetune":
    finetune = {k: v for k, v in target.items() if k not in ("init_from", "dont_load")}
    return {"probe": probe, "probe_then_finetune": dict(finetune, init_from="stage:probe")}
  if recipe in PEFT_RECIPES:
    # A head the target re-initialises (dont_load) must train, or it keeps its initial weights (ViT's zeros: the
    # adapters then get no gradient either): trained fully, as PEFT's sequence-classification task type does.
    new_head = any(re.search(pattern, "head/kernel") for pattern in target.get("dont_load", ()))
    decided = sorted(set(lora or {}) & {"method", "dora", "quantize"})
    if decided:  # (they were overwritten silently: lora={'dora': True} under 'qlora' trained plain QLoRA)
      raise FinetuneError(f"recipe {recipe!r} decides config.peft.{', '.join(decided)} itself, so lora= must not set "
                          f"{'it' if len(decided) == 1 else 'them'}: choose the recipe (lora, dora, qlora), or write "
                          "the stage's peft section by hand for a combination no recipe names (QLoRA with DoRA)")
    peft = {"method": "lora", "rank": 8, "alpha": 16.0, "dropout": 0.1,
            **({"modules_to_save": ("^head/",)} if new_head else {}), **(lora or {}),
            "dora": recipe == "dora", "quantize": "nf4" if recipe == "qlora" else ""}
    return {recipe: _merged(target, peft=peft, optimizer={"learning_rate": lora_lr})}
  # ulmfit: discriminative rates, slanted triangular learning rates and gradual unfreezing together.
  return {"ulmfit": _merged(target, optimizer={"lr_factor": lr_factor, "schedule": "stlr", "warmup_steps": 0},
                            unfreeze={"mode": "gradual", "every_steps": unfreeze_every})}


def _merged(target: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
  """`target` with each section's keys set inside the target's own section: a recipe adds lr_factor or first_n,
  it does not drop the learning rate, schedule or train_bn the target chose (a stage's section replaces the
  target's, and only the base config is merged under it)."""
  return {**target, **{name: {**target.get(name, {}), **values} for name, values in sections.items()}}


# Forgetting comparisons (configs/*_forgetting.py): plain fine-tuning and each regularizer from one source stage.
FORGETTING_VARIANTS = ("finetune", "ewc", "l2sp", "lwf", "rehearsal")
# The strength argument of each regularizing variant (forgetting_stages' keyword, the config files' `:arg`).
FORGETTING_STRENGTHS = {"ewc": "ewc_weight", "l2sp": "l2sp_alpha", "lwf": "lwf_weight",
                        "rehearsal": "rehearsal_fraction"}


def forgetting_variants(variant: str) -> tuple[str, ...]:
  """The variants `variant` names: all of them for 'all'; an unknown name is an error."""
  if variant != "all" and variant not in FORGETTING_VARIANTS:
    raise FinetuneError(f"unknown variant {variant!r}; valid: all, {', '.join(FORGETTING_VARIANTS)}")
  return FORGETTING_VARIANTS if variant == "all" else (variant,)


def forgetting_unread(variant: str) -> tuple[str, ...]:
  """The strength arguments that `variant`'s stages do not read (`:variant=ewc` reads no l2sp_alpha)."""
  chosen = forgetting_variants(variant)
  return tuple(strength for name, strength in FORGETTING_STRENGTHS.items() if name not in chosen)


def forgetting_stages(variant: str, target: dict, *, ewc_weight: float, l2sp_alpha: float, lwf_weight: float,
                      rehearsal_fraction: float) -> dict[str, dict]:
  """{stage name: overrides} for one variant (or all) of a forgetting comparison, from the plain target stage."""
  settings = {
      "finetune": {},
      "ewc": {"regularize": {"ewc": {"weight": ewc_weight}}},
      "l2sp": {"regularize": {"l2sp": {"alpha": l2sp_alpha, "beta": 1e-4}}, "optimizer": {"weight_decay": 0.0}},
      "lwf": {"regularize": {"lwf": {"weight": lwf_weight}}},
      "rehearsal": {"rehearsal": {"fraction": rehearsal_fraction}},
  }
  return {name: {**target, **settings[name]} for name in forgetting_variants(variant)}
