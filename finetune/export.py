"""`finetune export --workdir DIR --format hf|peft --out OUT`: a finished run for the Hugging Face ecosystem.

`hf`: reads the stage's resolved `config.json`, its latest checkpoint and (for text models) the tokenizer named in
`config.data.options.tokenizer`, and writes `config.json` + `model.safetensors` (+ tokenizer files) that
transformers loads; a PEFT run's adapters are merged into the weights first. `peft`: the run's LoRA adapter as
`adapter_config.json` + `adapter_model.safetensors` for `peft.PeftModel.from_pretrained` (`finetune/peft_format.py`).
Output folders are written to a temporary sibling and renamed into place, so a failed export leaves nothing
half-written.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Sequence

from ml_collections import ConfigDict

from finetune import adapters
from finetune import train as train_lib
from finetune.adapters import PEFT_METHODS
from finetune.checkpoint import DIVERGED_FILE, diverged_from, read_checkpoint_arrays, resolve_checkpoint
from finetune.errors import FinetuneError
from finetune.models import full_model_kwargs, hf
from finetune.reporting import read_json, staged_directory

FORMATS = ("hf", "peft")
# What an export may be told: where the run's base checkpoint and tokenizer are now (a run names them as given when
# it trained: a relative path from another folder, or a folder moved since). The weights fix everything else.
PATH_OVERRIDES = ("model.hf_config", "data.options.tokenizer")


def with_paths(cfg: ConfigDict, overrides: Sequence[str], verb: str = "export") -> ConfigDict:
  """`cfg` with `key=value` overrides of PATH_OVERRIDES applied; any other key is refused."""
  for override in overrides:
    key, _, value = override.partition("=")
    if key not in PATH_OVERRIDES:
      raise FinetuneError(f"{verb} may be given only where the run's files are now (--config."
                          f"{' or --config.'.join(PATH_OVERRIDES)}); got --config.{override}")
    section, *rest = key.split(".")
    target = cfg[section]
    for part in rest[:-1]:
      target = target[part]
    target[rest[-1]] = value
  return cfg


def _moved_hint(key: str) -> str:
  return (f"; a relative path is read from the current folder ({os.getcwd()}): if it moved or the run was made "
          f"elsewhere, pass where it is now, --config.{key}=DIR")


def _stages(workdir: str) -> list[str]:
  """A multi-stage workdir's stages: its config.json's, in order, then the run folders of earlier configs that
  shared the workdir (one variant per run: config.json names the last run's stages only, and `--stage full` worked
  while the error for a typo listed 'pretrain, frozen_2')."""
  config_path = os.path.join(workdir, "config.json")
  declared = list(read_json(config_path).get("stages", {})) if os.path.isfile(config_path) else []
  ran = sorted(name for name in os.listdir(workdir) if os.path.isfile(os.path.join(workdir, name, "init.json"))) \
      if os.path.isdir(workdir) else []
  return declared + [name for name in ran if name not in declared]


def latest_checkpoint(run_dir: str, verb: str, step: int | None = None) -> str:
  """`run_dir`'s newest checkpoints/<step> folder (a finished stage's: its final weights), or the one of `step`
  (`--step`: an intermediate checkpoint). A stage killed before its first checkpoint is told so, not sent to
  resolve_checkpoint's init_from wording."""
  checkpoints = os.path.join(run_dir, "checkpoints")
  if step is not None:
    kept = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit()) if os.path.isdir(checkpoints) else []
    if step not in kept:
      raise FinetuneError(f"--step {step}: {run_dir} has no checkpoint of that step; it keeps "
                          f"{', '.join(map(str, kept)) or 'none'} (config.train.keep_checkpoints)")
    first_bad = diverged_from(run_dir)
    if first_bad is not None and step >= first_bad:
      raise FinetuneError(f"--step {step}: the run's weights diverged from step {first_bad} on "
                          f"({os.path.join(run_dir, DIVERGED_FILE)}); choose an earlier step")
    return os.path.join(checkpoints, str(step))
  if not os.path.isdir(checkpoints) or not any(name.isdigit() for name in os.listdir(checkpoints)):
    if os.path.isfile(os.path.join(run_dir, DIVERGED_FILE)):  # ("train it further" would diverge again)
      raise FinetuneError(f"{run_dir} diverged before its first checkpoint ({os.path.join(run_dir, DIVERGED_FILE)} "
                          f"says why); train it again with the fix that file names, or {verb} another --stage")
    raise FinetuneError(f"{run_dir} has no checkpoint yet (checkpoints/<step>); train it further, or {verb} "
                        "another --stage")
  first_bad = diverged_from(run_dir)
  if first_bad is not None:  # the checkpoints from that step on hold the weights the run stopped on as diverged
    diverged = os.path.join(run_dir, DIVERGED_FILE)
    good = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit() and int(n) < first_bad)
    if not good:
      raise FinetuneError(f"{run_dir} stopped on diverged weights ({diverged}) and has no checkpoint before step "
                          f"{first_bad}; train it again with the fix that file names")
    print(f"{run_dir} diverged from step {first_bad} on ({diverged}): using its last good checkpoint, step "
          f"{good[-1]}", file=sys.stderr)
    return os.path.join(checkpoints, str(good[-1]))
  return resolve_checkpoint(run_dir, run_dir, unfinished=True)


def resolve_run_dir(workdir: str, stage: str = "", unfinished: bool = True, verb: str = "export") -> str:
  """The run folder of `workdir`'s `stage` (default: a single-stage run itself, or a multi-stage run's last stage).
  `unfinished=False` refuses a stage that has not finished (no summary.json), telling how to `verb` it anyway."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  parent = os.path.dirname(workdir)
  if os.path.basename(workdir).isdigit() and os.path.basename(parent) == "checkpoints":
    raise FinetuneError(f"{workdir} is one checkpoint of a run: pass the run's folder and the step, --workdir "
                        f"{os.path.dirname(parent)} --step {os.path.basename(workdir)}")
  single = os.path.isdir(os.path.join(workdir, "checkpoints"))  # a single-stage run lives in the workdir itself
  if stage and single:  # its one stage is named 'train' in results tables and summaries
    if stage != "train":
      raise FinetuneError(f"--stage {stage!r}: {workdir} holds a single-stage run, whose one stage is 'train'; "
                          "leave out --stage")
    run_dir = workdir
  elif stage:
    run_dir = os.path.join(workdir, stage)
    # (Any folder was taken: an export written inside the workdir was "not finished, finish it with train".)
    if _stages(workdir) and stage not in _stages(workdir):
      raise FinetuneError(f"--stage {stage!r}: {workdir} has no such stage; its stages: "
                          f"{', '.join(_stages(workdir))}")
  elif single:
    run_dir = workdir
  else:  # a multi-stage run: the last stage written in its config
    if not os.path.isfile(os.path.join(workdir, "config.json")):
      raise FinetuneError(f"{workdir} is not a run directory made by `finetune train` (no config.json)")
    stages = _stages(workdir)
    if not stages:
      raise FinetuneError(f"{workdir} holds no run (no checkpoints/ and no stages in config.json)")
    run_dir = os.path.join(workdir, stages[-1])
  if not os.path.isfile(os.path.join(run_dir, "config.json")):
    if os.path.basename(run_dir) in _stages(workdir):
      raise FinetuneError(f"stage {os.path.basename(run_dir)!r} of {workdir} has not run yet; finish it with "
                          "`finetune train` on the same --workdir, or name another --stage")
    raise FinetuneError(f"{run_dir} is not a run directory (no config.json); check --workdir and --stage")
  if not unfinished and not os.path.isfile(os.path.join(run_dir, "summary.json")):
    raise FinetuneError(f"{run_dir} has not finished (no summary.json); finish it with `finetune train` on the same "
                        f"--workdir, or pass --unfinished to {verb} its latest checkpoint")
  return run_dir


def export(workdir: str, out: str, fmt: str = "hf", stage: str = "", unfinished: bool = False,
           overrides: Sequence[str] = (), dtype: str = "float32", step: int | None = None) -> str:
  """Exports the final checkpoint of `workdir` (or of its `stage`); returns the architecture written.
  `unfinished=True` exports the latest checkpoint of a stage that has not finished; `overrides` say where the
  run's base checkpoint and tokenizer are now (PATH_OVERRIDES); `dtype` the written model's tensors (hf.EXPORT_DTYPES;
  a PEFT adapter stays float32, its written base_model/ takes it); `step` one of the stage's checkpoints instead of
  its final one (finished or not)."""
  if dtype not in hf.EXPORT_DTYPES:
    raise FinetuneError(f"unknown export dtype {dtype!r}; valid: {', '.join(hf.EXPORT_DTYPES)}")
  if fmt not in FORMATS:
    raise FinetuneError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
  run_dir = resolve_run_dir(workdir, stage, unfinished or step is not None, "export")
  out_path = os.path.abspath(os.path.expanduser(out))
  if run_dir == out_path or run_dir.startswith(out_path.rstrip(os.sep) + os.sep):
    raise FinetuneError(f"--out {out_path} holds the run being exported ({run_dir}) and would be replaced by the "
                        "export; choose a folder outside it")
  cfg = with_paths(ConfigDict(read_json(os.path.join(run_dir, "config.json"))), overrides)
  if cfg.model.get("hf_config"):  # (read for the architecture by everything below)
    try:
      hf.resolve_hf(cfg.model.hf_config)
    except FinetuneError as e:
      raise FinetuneError(f"{e}{_moved_hint('model.hf_config')}") from None
  hf.check_exportable(cfg.model.name)  # both formats write a transformers model (PEFT's: its base)
  peft_cfg = cfg.get("peft", ConfigDict({"method": ""}))
  if fmt == "peft":  # (before the checkpoint is read)
    _check_peft_exportable(peft_cfg, run_dir)
  arrays = read_checkpoint_arrays(latest_checkpoint(run_dir, "export", step))
  params = arrays["params"]
  num_classes = adapters.checkpoint_num_classes(params)
  if fmt == "peft":
    return _export_peft(cfg, arrays, num_classes, run_dir, out_path, dtype)
  if adapters.enabled(peft_cfg):  # the plain model with the adapters folded in
    if PEFT_METHODS.get(peft_cfg.method).merge is None:
      raise FinetuneError(f"{run_dir} trained config.peft.method={peft_cfg.method!r}, which adds computation a plain "
                          f"transformers model lacks, so it has no --format hf export; its adapter is "
                          f"{os.path.join(run_dir, 'adapter')}, loaded with "
                          "finetune.adapters.load_model(..., adapter=...)")
    params, _ = adapters.merge(adapters.abstract_model(cfg.model, peft_cfg, num_classes), peft_cfg, params,
                               arrays.get("model_state", {}))
  return _write_hf(cfg, params, num_classes, run_dir, out, dtype)


def _check_peft_exportable(peft_cfg: ConfigDict, run_dir: str) -> None:
  if not adapters.enabled(peft_cfg):
    raise FinetuneError(f"{run_dir} is not a PEFT run (config.peft.method is empty); use --format hf")
  if peft_cfg.method != "lora":
    merges = PEFT_METHODS.get(peft_cfg.method).merge is not None
    raise FinetuneError(f"--format peft exports LoRA adapters (and DoRA, rsLoRA); this run used config.peft.method="
                        f"{peft_cfg.method!r}: " + ("use --format hf, which folds it into the weights" if merges else
                                                   f"its adapter is {os.path.join(run_dir, 'adapter')}, loaded with "
                                                   "finetune.adapters.load_model(..., adapter=...)"))


def _export_peft(cfg: ConfigDict, arrays: dict, num_classes: int, run_dir: str, out: str, dtype: str) -> str:
  """The run's LoRA adapter in PEFT's format, with the base it belongs to: the Hugging Face checkpoint it started
  from when its frozen weights are that checkpoint's, else the run's own base written to OUT/base_model/."""
  from finetune import peft_format  # pylint: disable=g-import-not-at-top
  from finetune.methods import lora  # pylint: disable=g-import-not-at-top

  peft_cfg, params = cfg.peft, arrays["params"]
  base_paths = _base_paths(cfg, num_classes)
  adapter_dir = os.path.join(run_dir, "adapter")
  if adapters.is_adapter_dir(adapter_dir):
    trained = sorted(adapters.load_adapter(adapter_dir)[1])
  else:  # an unfinished run (--unfinished): the adapter folder is written when the stage ends
    trained = sorted(adapters.trainable_paths(peft_cfg, list(params), base_paths))
  abstract = adapters.abstract_model(cfg.model, peft_cfg, num_classes)
  recorded = read_json(os.path.join(run_dir, "config.json")).get("model", {}).get("hf_config", "")
  moved_to = cfg.model.get("hf_config", "") if cfg.model.get("hf_config", "") != recorded else ""
  base = _hf_base(run_dir, trained, full_model_kwargs(cfg.model, num_classes), moved_to)
  # Our own base is named by its absolute path: PEFT resolves a relative one against the current folder and else
  # asks the Hub for it (`AutoPeftModel.from_pretrained(OUT)` failed from any other folder, or took a `base_model/`
  # that happened to be there).
  # (realpath: staged_directory writes into a symbolic link's target, which a link moved later would not name)
  written_base = os.path.join(os.path.realpath(os.path.expanduser(out)), "base_model")
  tensors, adapter_config = peft_format.peft_adapter(cfg.model, peft_cfg, abstract, params, trained, num_classes,
                                                     base_model=base or written_base)
  with staged_directory(out) as staging:  # adapter and base_model/ appear together or not at all
    peft_format.write_adapter(staging, tensors, adapter_config)
    if not base:  # no Hugging Face checkpoint holds these frozen weights: write ours next to the adapter
      base_params, _ = lora.dequantized_base(abstract, params, arrays.get("model_state", {}))  # QLoRA: NF4 -> float
      _write_hf(cfg, {p: v for p, v in base_params.items() if p in base_paths}, num_classes, run_dir,
                os.path.join(staging, "base_model"), dtype)
  note = " (mean-pooled BERT: the base is a BertModel, the trained head is left out)" \
      if cfg.model.name == "bert" and cfg.model.get("pooling", "cls") == "mean" else ""
  if base and peft_cfg.quantize:  # PEFT's own QLoRA adapters name the float checkpoint too (quantized on loading)
    note += (f" (QLoRA: the base named is the float checkpoint {base}; the adapter trained on its "
             f"{peft_cfg.quantize.upper()}-rounded kernels, which --format hf folds in exactly)")
  if base and num_classes and peft_format.saves_classifier(cfg.model.name, full_model_kwargs(cfg.model, num_classes)):
    base_labels = read_json(os.path.join(base, "config.json")).get("id2label") or {}
    labels = len(base_labels) or 2  # (transformers' default)
    classes = train_lib.trained_classes(run_dir) or [str(i) for i in range(num_classes)]
    if labels != num_classes:  # (PEFT's load failed on the classifier's shape, [K, d] vs the base's [2, d])
      note += (f" (the classifier has {num_classes} classes and {base} {labels}: load it with "
               f"num_labels={num_classes}, ignore_mismatched_sizes=True; the adapter's classifier replaces it)")
    if [base_labels.get(str(i), f"LABEL_{i}") for i in range(labels)] != list(classes):
      # (PEFT loads the base's config: its label names, not the classes the adapter's classifier was trained on)
      mapping = {i: name for i, name in enumerate(classes)}
      note += (f" (the base's config names its labels otherwise: pass id2label={mapping}, label2id="
               f"{ {name: i for i, name in mapping.items()} } when loading)")
  if not base:
    note += f" (adapter_config.json names {written_base} as its base: after moving the folder, pass the new one)"
  return "PEFT LoRA adapter" + ("" if base else " + base_model/") + note


def _hf_base(run_dir: str, trained: list[str], run_kwargs: dict, moved_to: str = "") -> str:
  """The Hugging Face checkpoint whose weights are the run's frozen base, or '' when there is none: the run must
  have started from it directly (init.json's source), everything it re-initialised must be trained (so in the
  adapter), and its architecture must be the checkpoint's (`run_kwargs`: the run's model arguments). A run that
  changed it (`config.model.num_layers=1` on a 2-layer checkpoint) left checkpoint arrays unused: PEFT would load
  the adapter onto the whole checkpoint, warn only of missing adapter keys and compute another function.
  `config.model.hf_config` alone says nothing: it gives the architecture, and an earlier stage (or a random
  start) may have given the weights. `moved_to`: where `--config.model.hf_config` says the base is now, taken
  when the recorded source is gone (else the export wrote a whole base_model/ copy instead of naming it)."""
  init_path = os.path.join(run_dir, "init.json")
  init = read_json(init_path) if os.path.isfile(init_path) else {}
  source = init.get("source", "")
  if source and not os.path.exists(source) and moved_to and hf.is_hf_checkpoint(os.path.expanduser(moved_to)):
    source = os.path.abspath(os.path.expanduser(moved_to))
  if not source or not hf.is_hf_checkpoint(source) or set(init.get("fresh", ())) - set(trained):
    return ""
  _, architecture = hf.model_kwargs(source)
  if any(run_kwargs.get(key) != value for key, value in architecture.items()):
    return ""
  return source


def _base_paths(cfg: ConfigDict, num_classes: int) -> set[str]:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from finetune.partition import flatten  # pylint: disable=g-import-not-at-top
  plain = adapters.abstract_model(cfg.model, ConfigDict({"method": ""}), num_classes)
  return set(flatten(nnx.state(plain, nnx.Param).to_pure_dict()))


def _write_hf(cfg: ConfigDict, params: dict, num_classes: int, run_dir: str, out: str, dtype: str = "float32") -> str:
  kwargs = full_model_kwargs(cfg.model, num_classes)
  # (an unfinished run's are in its init.json: the indices named a run on classes 5..9 '0'..'4')
  class_names = train_lib.trained_classes(run_dir) or [str(i) for i in range(num_classes)]
  base_dir = hf.resolve_hf(cfg.model.hf_config) if cfg.model.get("hf_config") else ""
  base = hf.read_config(base_dir) if base_dir else None
  # Read before anything is written (a missing tokenizer failed after the weights), and as its files define it:
  # training sets a pad token and right padding (data/text.py), which a causal LM's batched generation must not get.
  tokenizer_path = cfg.data.get("options", {}).get("tokenizer", "")
  tokenizer = None
  if tokenizer_path:
    from finetune.data.text import read_tokenizer  # pylint: disable=g-import-not-at-top
    try:
      tokenizer = read_tokenizer(tokenizer_path)
    except FinetuneError as e:
      raise FinetuneError(f"{e}{_moved_hint('data.options.tokenizer')}") from None
    if cfg.data.name == "instructions" and not getattr(tokenizer, "chat_template", None):
      # Fine-tuned on the plain "### User:" template: ship it, so apply_chat_template prompts as training did.
      from finetune.data.instructions import plain_chat_template  # pylint: disable=g-import-not-at-top
      tokenizer.chat_template = plain_chat_template(tokenizer)
  with staged_directory(out) as staging:
    architecture = hf.export_params(cfg.model.name, params, kwargs, class_names, staging, base, dtype)
    # The base's decoding settings (eos ids, sampling defaults) stay with the model, as save_pretrained keeps them.
    generation = os.path.join(base_dir, "generation_config.json") if base_dir else ""
    if generation and os.path.isfile(generation):
      shutil.copyfile(generation, os.path.join(staging, "generation_config.json"))
    if tokenizer is not None:
      tokenizer.save_pretrained(staging)
  return architecture
