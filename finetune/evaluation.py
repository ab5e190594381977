"""A finished run evaluated again, on its own evaluation splits or on other data (`finetune eval`).

Training already evaluates every split of `config.data.eval_splits` at its end (`summary.json: final`). This is for
afterwards: the same weights on another split, another test file of the same classes, or a mesh that fits another
machine, without retraining and without writing into the run. Data whose classes differ from those the head was
trained on (other classes, the same ones in another order) is refused: labels would not mean what the head's outputs
mean. The stage is rebuilt from its `config.json` with `data.*` and `mesh.*` overrides only (everything else is what
the weights were trained as), and its final checkpoint (an early-stopped stage's best weights) is read onto that
mesh.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from finetune import config as config_lib
from finetune import train as train_lib
from finetune.checkpoint import read_checkpoint_arrays
from finetune.data.pipeline import build_pipeline
from finetune.errors import FinetuneError
from finetune.export import latest_checkpoint, resolve_run_dir
from finetune.partition import map_with_path
from finetune.reporting import read_json

# What an evaluation may change: the data it reads, the devices it runs on, and where the run's base checkpoint is
# now (its architecture is read from there: a relative path from another folder, or a folder moved since).
OVERRIDABLE = ("data.", "mesh.", "model.hf_config=")


def _trained_classes(run_dir: str, raw: dict[str, Any], overrides: Sequence[str]) -> tuple[str, ...] | None:
  """The class names the stage trained on, in label order: its summary's or init.json's, or (a run started before
  init.json recorded them) its own data's, loaded again where data overrides may have changed them (None without
  them). The record is read with or without overrides: the data's files may have changed since (a label renamed in
  a CSV renumbers the classes, and the head's outputs would be scored against other labels)."""
  recorded = train_lib.trained_classes(run_dir)
  if recorded is not None:
    return tuple(recorded)
  if not any(override.startswith("data.") for override in overrides):
    return None
  cfg = config_lib.build_config(ConfigDict(raw), [o for o in overrides if not o.startswith("data.")])
  return tuple(build_pipeline(cfg.data, cfg.seed).class_names)


def evaluate_run(workdir: str, stage: str = "", overrides: Sequence[str] = (), unfinished: bool = False,
                 step: int | None = None, per_class: dict[str, dict[str, Any]] | None = None
                 ) -> dict[str, dict[str, float]]:
  """{split: metrics} of the final weights of `workdir` (or of its `stage`; or of its checkpoint at `step`) on the
  stage's evaluation splits, after `overrides` (`data.key=value` / `mesh.key=value`); for a class task each split's
  per-class scores (as `per_class.json`) go into `per_class` when given. Writes nothing."""
  for override in overrides:
    if not override.startswith(OVERRIDABLE):
      raise FinetuneError(f"eval may override data.* and mesh.* keys and model.hf_config (where the base checkpoint "
                          f"is now) only (the weights fix the rest); got --config.{override}")
  run_dir = resolve_run_dir(workdir, stage, unfinished or step is not None, "evaluate")
  step_dir = latest_checkpoint(run_dir, "evaluate", step)
  # (A base config's settings for other stages' schedules are in every stage's file: unread here, so reset.)
  raw = config_lib.without_unread_settings(read_json(os.path.join(run_dir, "config.json")))
  # Nothing is loaded or trained: the weights come from the checkpoint (adapters included), regularizers and
  # rehearsal only shape training, cached features would swap in the head alone, fed by an extraction this does
  # not run, and early stopping would watch a split the overrides may have dropped. A stage that turned PEFT off
  # (method '') under a base config's settings keeps them in its config.json: unused, so dropped.
  for section in ("regularize", "rehearsal"):
    raw.pop(section, None)
  raw.setdefault("train", {}).pop("early_stopping", None)
  if not raw.get("peft", {}).get("method"):
    raw.pop("peft", None)
  raw.update(init_from="", dont_load=(), features={**raw.get("features", {}), "cache": False},
             peft={**raw.get("peft", {}), "load_adapter": ""})
  cfg = config_lib.build_config(ConfigDict(raw), overrides)
  trained_fraction = raw.get("data", {}).get("validation_fraction", cfg.data.validation_fraction)
  if cfg.data.validation_fraction > trained_fraction:
    # Validation is the first fraction of one fixed permutation of the training rows: a larger one takes rows the
    # stage trained on. (A smaller one is a part of its own validation rows.)
    raise FinetuneError(f"config.data.validation_fraction={cfg.data.validation_fraction} would carve rows the stage "
                        f"trained on (it held out {trained_fraction}); evaluate {trained_fraction} or less, or "
                        "another split")
  trained_stratify = raw.get("data", {}).get("stratify", False)
  if cfg.data.validation_fraction and cfg.data.stratify != trained_stratify:
    # (the other order carves other rows: 23 of 898 training rows in the validation split, on digits at 0.5)
    raise FinetuneError(f"config.data.stratify={cfg.data.stratify} would carve the validation split from rows the "
                        f"stage trained on (it carved with stratify={trained_stratify}); leave data.stratify as "
                        "the run had it")
  eval_stage = train_lib.build_stage(cfg, evaluation_only=True)
  trained_on = _trained_classes(run_dir, raw, overrides)
  if trained_on is not None and tuple(eval_stage.pipeline.class_names) != trained_on:
    # (data.classes renumbers the kept classes 0..n-1, so equal counts pass every shape check)
    given = "the overrides give" if any(o.startswith("data.") for o in overrides) else "the data now gives"
    raise FinetuneError(f"the weights were trained on classes {list(trained_on)}, in that order, but {given} "
                        f"{list(eval_stage.pipeline.class_names)}; evaluate data with the same classes in the same "
                        "order (data.classes, data.name, or the data's files as they were)")
  arrays = read_checkpoint_arrays(step_dir)
  abstract = eval_stage.abstract_state(0)

  def placed(section: str, shapes: Any, shardings: Any) -> Any:
    stored = arrays.get(section, {})

    def take(path: str, shape: jax.ShapeDtypeStruct) -> np.ndarray:
      if path not in stored:
        raise FinetuneError(f"{step_dir} has no {section} entry {path!r} that this config's model reads; the "
                            "overrides changed the model (e.g. data.classes sets the head's size): keep them to "
                            "the data the weights fit")
      if tuple(stored[path].shape) != tuple(shape.shape):
        raise FinetuneError(f"{step_dir}: {section} entry {path!r} is {tuple(stored[path].shape)}, but this "
                            f"config's model needs {tuple(shape.shape)}; the overrides changed the model (e.g. "
                            "data.classes sets the head's size): keep them to the data the weights fit")
      return np.asarray(stored[path], shape.dtype)

    # Checkpoints hold layers one by one (`scan.Layout`): read them unrolled, stack them as this stage stores them.
    layout = eval_stage.layout
    return jax.device_put(layout.unview(map_with_path(take, layout.view_shapes(shapes))), shardings)

  weights = {"params": placed("params", abstract.params, eval_stage.params_sharding),
             "model_state": placed("model_state", abstract.model_state, eval_stage.model_state_sharding)}
  scores = {split: {} for split in eval_stage.pipeline.eval_splits}
  results = {split: train_lib.evaluate(eval_stage.eval_step(), weights, eval_stage.pipeline, split, eval_stage.mesh,
                                       scores[split])
             for split in eval_stage.pipeline.eval_splits}
  train_lib.check_finite_evaluation(results, int(os.path.basename(step_dir)))
  if per_class is not None:
    per_class.update({split: {"classes": list(eval_stage.pipeline.class_names), **values}
                      for split, values in scores.items() if values})
  return results


def results_table(results: dict[str, dict[str, float]]) -> str:
  """One row per split: loss, accuracy (and perplexity for token-level tasks), examples."""
  perplexity = any("perplexity" in metrics for metrics in results.values())
  header = f"{'split':<14}{'loss':>10}{'accuracy':>10}" + (f"{'perplexity':>12}" if perplexity else "") + \
      f"{'examples':>10}"
  rows = [header]
  for split, metrics in results.items():
    rows.append(f"{split:<14}{metrics['loss']:>10.4f}{metrics['accuracy']:>10.4f}" +
                (f"{metrics.get('perplexity', float('nan')):>12.2f}" if perplexity else "") +
                f"{metrics['num_examples']:>10}")
  return "\n".join(rows)
