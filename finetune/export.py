"""`finetune export --workdir DIR --format hf --out OUT`: a finished run's parameters as a Hugging Face checkpoint.

Reads the stage's resolved `config.json`, its latest checkpoint and (for text models) the tokenizer named in
`config.data.options.tokenizer`, and writes `config.json` + `model.safetensors` (+ tokenizer files) that
transformers loads. The output folder is written to a temporary sibling and renamed into place, so a failed export
leaves nothing half-written.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile

from ml_collections import ConfigDict

from finetune.checkpoint import read_checkpoint_arrays, resolve_checkpoint
from finetune.errors import FinetuneError
from finetune.models import MODELS, hf, model_kwargs

FORMATS = ("hf",)


def full_model_kwargs(model_cfg: ConfigDict, num_classes: int) -> dict:
  """Every constructor argument of the run's model: its defaults, overridden by what the config set."""
  signature = inspect.signature(MODELS.get(model_cfg.name).__init__)
  defaults = {name: p.default for name, p in signature.parameters.items()
              if p.default is not inspect.Parameter.empty}
  return {**defaults, **model_kwargs(model_cfg, num_classes)}


def _run_dir(workdir: str, stage: str) -> str:
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if stage:
    run_dir = os.path.join(workdir, stage)
  elif os.path.isdir(os.path.join(workdir, "checkpoints")):
    run_dir = workdir
  else:  # a multi-stage run: the last stage written in its config
    if not os.path.isfile(os.path.join(workdir, "config.json")):
      raise FinetuneError(f"{workdir} is not a run directory made by `finetune train` (no config.json)")
    with open(os.path.join(workdir, "config.json")) as f:
      stages = list(json.load(f).get("stages", {}))
    if not stages:
      raise FinetuneError(f"{workdir} holds no run (no checkpoints/ and no stages in config.json)")
    run_dir = os.path.join(workdir, stages[-1])
  if not os.path.isfile(os.path.join(run_dir, "config.json")):
    raise FinetuneError(f"{run_dir} is not a run directory (no config.json); check --workdir and --stage")
  return run_dir


def export(workdir: str, out: str, fmt: str = "hf", stage: str = "") -> str:
  """Exports the latest checkpoint of `workdir` (or of its `stage`); returns the architecture written."""
  if fmt not in FORMATS:
    raise FinetuneError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
  run_dir = _run_dir(workdir, stage)
  with open(os.path.join(run_dir, "config.json")) as f:
    cfg = ConfigDict(json.load(f))
  arrays = read_checkpoint_arrays(resolve_checkpoint(run_dir, run_dir))
  params = arrays["params"]
  num_classes = params["head/kernel"].shape[1] if "head/kernel" in params else 0  # language models: no head
  kwargs = full_model_kwargs(cfg.model, num_classes)
  summary_path = os.path.join(run_dir, "summary.json")
  class_names = json.load(open(summary_path))["classes"] if os.path.exists(summary_path) else \
      [str(i) for i in range(num_classes)]
  base = hf.read_config(hf.resolve_hf(cfg.model.hf_config)) if cfg.model.get("hf_config") else None
  out = os.path.abspath(os.path.expanduser(out))
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
  try:
    architecture = hf.export_params(cfg.model.name, params, kwargs, class_names, staging, base)
    tokenizer = cfg.data.get("options", {}).get("tokenizer", "")
    if tokenizer:
      from finetune.data.text import load_tokenizer  # pylint: disable=g-import-not-at-top
      load_tokenizer(tokenizer).save_pretrained(staging)
    if os.path.exists(out):
      shutil.rmtree(out)
    os.replace(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return architecture
