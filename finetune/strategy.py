"""A stage's fine-tuning strategy, resolved into one table: parameter -> group, frozen?, peak learning rate.

`resolve_strategy` combines the layer groups (the model's `layer_groups()` or `config.groups`), freezing
(`methods/freezing.py`), discriminative learning rates (`methods/discriminative.py`) and the unfreezing phases
(`methods/unfreezing.py`). The optimizer builds one optax partition entry per *label* (a group, or a group with a
regex multiplier) plus 'frozen' (`optax.set_to_zero`, no state); the train step differentiates only the parameters
trainable in the current phase. The table is written to `partition.tsv` in the run directory.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
from flax import nnx
from ml_collections import ConfigDict

from finetune import adapters, files
from finetune.errors import FinetuneError
from finetune.methods import discriminative, freezing, unfreezing
from finetune.partition import assign_groups, flatten, path_str

FROZEN = "frozen"


@dataclasses.dataclass(frozen=True)
class Strategy:
  groups: tuple[str, ...]  # ordered input to output
  group_of: Mapping[str, str]  # parameter path -> group
  shapes: Mapping[str, tuple[int, ...]]
  frozen: frozenset[str]  # paths never trained in this stage
  group_lr: Mapping[str, float]  # group -> peak learning rate (discriminative rates)
  multiplier: Mapping[str, float]  # path -> regex learning-rate multiplier (1.0 for most)
  batch_norm: Mapping[str, tuple[str, ...]]  # BatchNorm module path -> its parameter paths
  always_trainable: frozenset[str]  # BatchNorm parameters under freeze.train_bn: trained in every phase
  phases: tuple[unfreezing.Phase, ...]
  schedule_mode: str  # config.unfreeze.schedule: 'continue', 'restart' or 'cycle' (finetune/optim.py)

  @classmethod
  def single_group(cls, params: Any, learning_rate: float, name: str = "all") -> "Strategy":
    """Everything in one trainable group: plain fine-tuning of `params` (a pytree; abstract is fine)."""
    shapes = {p: tuple(x.shape) for p, x in flatten(params).items()}
    return cls(groups=(name,), group_of={p: name for p in shapes}, shapes=shapes, frozen=frozenset(),
               group_lr={name: learning_rate}, multiplier={p: 1.0 for p in shapes}, batch_norm={},
               always_trainable=frozenset(), phases=(unfreezing.Phase(0, (name,)),), schedule_mode="continue")

  def phase_index(self, step: int) -> int:
    """The phase that step `step` (0-based update index) belongs to."""
    return max(i for i, phase in enumerate(self.phases) if phase.start <= step)

  def phase_span(self, phase: int, total_steps: int | None) -> tuple[int, int | None]:
    """(first step, end step, exclusive) of `phase`; the last phase ends at `total_steps`."""
    last = phase + 1 == len(self.phases)
    return self.phases[phase].start, total_steps if last else self.phases[phase + 1].start

  def trainable(self, phase: int) -> frozenset[str]:
    groups = set(self.phases[phase].trainable_groups)
    return frozenset(p for p, g in self.group_of.items()
                     if p not in self.frozen and (g in groups or p in self.always_trainable))

  def ever_trainable(self) -> frozenset[str]:
    """The parameters that train in some phase."""
    return frozenset().union(*(self.trainable(phase) for phase in range(len(self.phases))))

  def peak_lr(self, path: str) -> float:
    return self.group_lr[self.group_of[path]] * self.multiplier[path]

  def label(self, path: str) -> str:
    """The optimizer partition entry of a (non-frozen) path: its group, `group*multiplier` for regex multipliers,
    and `group:bn` for BatchNorm parameters that train in every phase (train_bn). A label's parameters train or
    rest together, so its optimizer-state structure never changes between phases."""
    group, multiplier = self.group_of[path], self.multiplier[path]
    label = group if multiplier == 1.0 else f"{group}*{multiplier:g}"
    return label + ":bn" if path in self.always_trainable else label

  def labels(self) -> dict[str, float]:
    """{label: peak learning rate} for every label that trains at some point, in group order."""
    result = {}
    for group in self.groups:
      for path, g in self.group_of.items():
        if g == group and path not in self.frozen:
          result.setdefault(self.label(path), self.peak_lr(path))
    return result

  def _trains(self, label: str, phase: int) -> bool:
    return any(self.label(p) == label for p in self.trainable(phase))

  def label_start(self, label: str, phase: int | None = None) -> int:
    """The step from which `label` has trained without a break up to `phase` (default: its first phase).

    This is where its optimizer state (and update count) began: a label frozen for a while and trained again
    (chain-thaw) starts afresh, as a separate fine-tuning run would.
    """
    if phase is None:
      phase = next(q for q in range(len(self.phases)) if self._trains(label, q))
    while phase > 0 and self._trains(label, phase - 1):
      phase -= 1
    return self.phases[phase].start

  def labels_tree(self, params: Any, phase: int, path_of: Callable[[str], str] = lambda path: path) -> Any:
    """The optax partition labels for `params` in `phase` ('frozen' for everything not trained in it). `path_of`
    maps a leaf's path to the parameter path whose label it takes (scanned layers: a segment of a stack)."""
    trainable = self.trainable(phase)

    def label(keypath) -> str:
      path = path_of(path_str(keypath))
      return self.label(path) if path in trainable else FROZEN

    return jax.tree_util.tree_map_with_path(lambda keypath, _: label(keypath), params)

  def frozen_batch_norm(self, phase: int) -> tuple[str, ...]:
    """BatchNorm modules run in inference mode in `phase`: those with no parameter training in it."""
    trainable = self.trainable(phase)
    return tuple(module for module, params in self.batch_norm.items() if not set(params) & trainable)

  def counts(self, phase: int = 0) -> dict[str, int]:
    trainable = self.trainable(phase)
    sizes = {p: math.prod(s) for p, s in self.shapes.items()}
    return {"params": sum(sizes.values()), "trainable": sum(sizes[p] for p in trainable),
            "frozen": sum(sizes[p] for p in sizes if p not in trainable)}

  def training_spans(self) -> dict[str, tuple[tuple[int, int | None], ...]]:
    """{path: the (first, end) step ranges it trains in, end exclusive, None for the stage's end}: ((0, None),) for
    the whole stage, ((0, 3), (12, None)) for a chain-thaw group resting from step 3 to 11; () if frozen."""
    trainable = [self.trainable(q) for q in range(len(self.phases))]
    bounds = [self.phase_span(q, None) for q in range(len(self.phases))]
    result = {}
    for path in self.group_of:
      spans: list[tuple[int, int | None]] = []
      for (start, end), trains in zip(bounds, (path in t for t in trainable)):
        if trains and spans and spans[-1][1] == start:
          spans[-1] = (spans[-1][0], end)
        elif trains:
          spans.append((start, end))
      result[path] = tuple(spans)
    return result

  def table(self) -> str:
    """Tab-separated: one row per parameter (group, shape, trainable per phase, peak lr, label, steps it trains)."""
    header = ["path", "group", "shape", "frozen_for_stage", "trainable_from_step", "peak_lr", "label",
              "training_steps"]
    rows = ["\t".join(header)]
    spans = self.training_spans()
    for path, group in self.group_of.items():
      frozen = path in self.frozen
      start = "" if frozen else str(self.label_start(self.label(path)))
      rows.append("\t".join([path, group, "x".join(map(str, self.shapes[path])) or "scalar", str(frozen).lower(),
                             start, "0" if frozen else f"{self.peak_lr(path):.6g}",
                             FROZEN if frozen else self.label(path), _steps_text(spans[path])]))
    return "\n".join(rows) + "\n"

  def short(self) -> str:
    """One line per group: parameters, frozen or in which steps it trains, peak learning rate."""
    lines = []
    spans_of = self.training_spans()

    def when(spans: tuple) -> str:  # (chain-thaw's resting groups were reported as training from their first step)
      if len(spans) == 1 and spans[0][1] is None:
        return "throughout" if spans[0][0] == 0 else f"from step {spans[0][0]}"
      return f"in steps {_steps_text(spans)}"

    for group in self.groups:
      paths = [p for p, g in self.group_of.items() if g == group]
      size = sum(math.prod(self.shapes[p]) for p in paths)
      live = [p for p in paths if p not in self.frozen]
      if not live:
        state = "frozen"
      else:
        spans = collections.Counter(spans_of[p] for p in live)
        if len(spans) == 1:
          state = "trains " + when(next(iter(spans)))
          state = "trains" if state == "trains throughout" else state
        else:  # e.g. train_bn under gradual unfreezing: the group's BatchNorm trains before its kernels
          state = "trains in parts: " + ", ".join(f"{n} tensor{'s' if n > 1 else ''} {when(span)}"
                                                  for span, n in sorted(spans.items(), key=_by_first_step))
        if len(live) < len(paths):
          state += f" ({len(paths) - len(live)} of {len(paths)} tensors frozen)"
        state += f", peak lr {self.group_lr[group]:.3g}"
      lines.append(f"  {group:<12} {size:>10,} params  {state}")
    return "\n".join(lines)


def _by_first_step(item: tuple[tuple, int]) -> tuple[int, str]:
  return item[0][0][0], _steps_text(item[0])  # (spans compare badly: an open end is None)


def _steps_text(spans: tuple[tuple[int, int | None], ...]) -> str:
  """'0-2, 12-' for ((0, 3), (12, None)): inclusive step ranges, open at the stage's end."""
  return ", ".join(f"{start}-{'' if end is None else end - 1}" for start, end in spans)


def batch_norm_modules(abstract_model: nnx.Module) -> dict[str, tuple[str, ...]]:
  return {path_str(path): (path_str(path) + "/scale", path_str(path) + "/bias")
          for path, node in nnx.iter_graph(abstract_model) if isinstance(node, nnx.BatchNorm)}


def resolve_strategy(cfg: ConfigDict, abstract_model: nnx.Module, abstract_params: Any, total_steps: int,
                     steps_per_epoch: int, peft_trainable: frozenset[str] | None = None) -> Strategy:
  """The stage's table. With a PEFT method (`peft_trainable`: what it trains), everything else is frozen too."""
  shapes = {p: tuple(x.shape) for p, x in flatten(abstract_params).items()}
  if cfg.groups:
    groups_spec: Sequence[tuple[str, str]] = [tuple(g) for g in cfg.groups]
    source = "config.groups"
  else:
    groups_spec = abstract_model.layer_groups()
    source = f"layer groups of model {cfg.model.name!r}"
  groups = tuple(name for name, _ in groups_spec)
  group_of = assign_groups(list(shapes), groups_spec, source)
  batch_norm = batch_norm_modules(abstract_model)
  bn_params = {p for params in batch_norm.values() for p in params if p in shapes}
  frozen = freezing.frozen_paths(cfg.freeze, groups, group_of, bn_params)
  if peft_trainable is not None:
    peft_frozen = frozenset(p for p in shapes if p not in peft_trainable)
    _check_rules_reach_trainable(
        [("config.freeze.patterns", pattern, "drop it") for pattern in cfg.freeze.patterns] +
        [("config.optimizer.lr_multipliers", rule[0], "drop it, or train them with config.peft.modules_to_save")
         for rule in cfg.optimizer.lr_multipliers],
        list(shapes), peft_frozen, f"that config.peft.method={cfg.peft.method!r} freezes anyway")
    for pattern in cfg.peft.modules_to_save:  # (trained fully, then frozen by config.freeze: it changed nothing)
      saved = [p for p in shapes if re.search(pattern, p)]
      if saved and all(p in frozen for p in saved):
        raise FinetuneError(f"config.peft.modules_to_save entry {pattern!r} trains {', '.join(saved[:3])}"
                            f"{', ...' if len(saved) > 3 else ''} fully, but config.freeze freezes all of them, so it "
                            "changes nothing; drop the entry or the freeze rule")
    frozen = frozen | peft_frozen
    if len(frozen) == len(shapes):
      raise FinetuneError("config.freeze freezes every parameter the PEFT method trains; leave some trainable")
  _check_rules_reach_trainable([("config.optimizer.lr_multipliers", rule[0], "drop it or unfreeze them")
                                for rule in cfg.optimizer.lr_multipliers],
                               list(shapes), frozen, "config.freeze freezes for the stage")
  always_trainable = frozenset(bn_params - frozen) if cfg.freeze.train_bn else frozenset()
  group_lr = discriminative.group_peak_lrs(cfg.optimizer, groups)
  multiplier = discriminative.path_multipliers(cfg.optimizer, list(shapes))
  if peft_trainable is not None:  # e.g. LoRA+: B learns faster than A
    method = adapters.PEFT_METHODS.get(cfg.peft.method)
    multiplier = {p: m * method.lr_multiplier(p, cfg.peft) for p, m in multiplier.items()}
  # Groups that unfreezing schedules: those with a parameter that is neither frozen nor always training.
  unfreezable = [g for g in groups
                 if any(group_of[p] == g and p not in frozen and p not in always_trainable for p in shapes)]
  phases = unfreezing.phases(cfg.unfreeze, groups, unfreezable, total_steps, steps_per_epoch)
  return Strategy(groups=groups, group_of=group_of, shapes=shapes, frozen=frozen, group_lr=group_lr,
                  multiplier=multiplier, batch_norm=batch_norm, always_trainable=always_trainable, phases=phases,
                  schedule_mode=cfg.unfreeze.schedule)


def _check_rules_reach_trainable(rules: Sequence[tuple[str, str, str]], paths: Sequence[str],
                                 untrained: frozenset[str], why: str) -> None:
  """A rule (where, regex, fix) whose parameters are all `untrained` (`why` says by what) changes nothing: as a rule
  that matches nothing, it is a mistake (a rate meant for the embeddings under LoRA, say)."""
  for where, pattern, fix in rules:
    matched = [p for p in paths if re.search(pattern, p)]
    if matched and all(p in untrained for p in matched):
      raise FinetuneError(f"{where}: pattern {pattern!r} matches only parameters {why} ({', '.join(matched[:3])}"
                          f"{', ...' if len(matched) > 3 else ''}), so it changes nothing; {fix}")


def write_table(strategy: Strategy, run_dir: str, stage: str) -> None:
  """partition.tsv in the run directory, and the short form on stdout (process 0; stderr is kept for errors)."""
  if jax.process_index() != 0:
    return
  files.write_text(os.path.join(run_dir, "partition.tsv"), strategy.table())
  counts = strategy.counts(0)
  print(f"[{stage}] {counts['trainable']:,} of {counts['params']:,} parameters train at step 0; layer groups:\n"
        f"{strategy.short()}", flush=True)
  if len(strategy.phases) > 1:
    print(f"[{stage}] unfreezing: " + "; ".join(f"step {p.start}: {', '.join(p.trainable_groups)}"
                                               for p in strategy.phases), flush=True)
