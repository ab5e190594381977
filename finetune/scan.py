"""Scanned layers (`config.train.scan_layers`): a model's stack of identical blocks stored and run as one.

`scan_model` replaces the model's block list (the attribute its class names in `scan_blocks`) by one block whose
variables carry a leading layer axis (`models.layers.stack_blocks`); the forward pass runs it under `jax.lax.scan`
(`models.layers.run_blocks`), so compile time stops growing with depth.

Everything written in parameter paths keeps the *unrolled* vocabulary (`layers/3/attention/query/kernel`): layer
groups, freezing, discriminative and per-group learning rates, gradual unfreezing, LoRA targets, regularizer anchors,
adapters and exports. `Layout.view` presents the stacked parameters as that unrolled tree (layer i of a stacked
leaf is the slice [i]) and `Layout.unview` stacks it back.

The optimizer sees *segments*: runs of consecutive layers that the strategy treats identically (same trainability
in every phase, peak learning rate and start), each one slice [a:b] of the stack under the key 'a-(b-1)'. A segment
takes the optimizer label of its first layer. Full fine-tuning or LoRA gives one segment per stack, so the optimizer
update does not grow with depth either; freezing the first n layers gives two; per-layer learning rates or gradual
unfreezing give one per layer, which is what they need: each frozen layer has no optimizer state and each thawed
one starts its own, exactly as unrolled (`with_segments`).

Checkpoints hold the stacked arrays; `layout.json` next to them records the stacks, and `read_checkpoint_arrays`
returns every checkpoint unrolled, so a checkpoint converts between the two forms wherever it is loaded
(`init_from`, export, regularizer anchors).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from finetune import files
from finetune.errors import FinetuneError
from finetune.models.layers import SCAN_LENGTH, stack_blocks
from finetune.reporting import read_json

LAYOUT_FILE = "layout.json"
# The checkpoint format a run writes, LAYOUT_FILE's "format" (and adapter.json's): 2 since GPT-2's c_attn is stored
# head by head. Checkpoints beside no LAYOUT_FILE, or one without "format", are of format 1. A change to how a model
# stores a parameter raises it, with the change in that model's `layout_changes` (finetune/models/__init__.py).
FORMAT = 2


def scan_model(model: nnx.Module) -> nnx.Module:
  """`model` with its block list (class attribute `scan_blocks`) replaced by one stacked block, in place."""
  attribute = getattr(type(model), "scan_blocks", None)
  if attribute is None:
    raise FinetuneError(f"model {type(model).__name__} has no stack of identical blocks to scan; set "
                        "config.train.scan_layers=False")
  try:
    setattr(model, attribute, stack_blocks(list(getattr(model, attribute))))
  except ValueError as e:
    raise FinetuneError(f"config.train.scan_layers: {e}") from None
  return model


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which top-level entries of the parameter tree are stacked, and how many layers each holds."""

  stacks: tuple[tuple[str, int], ...] = ()
  # Optimizer segments per stack: ((name, ((start, end), ...)), ...); default one per layer.
  segments: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = ()

  @classmethod
  def of(cls, model: nnx.Module) -> "Layout":
    return cls(tuple((name, getattr(node, SCAN_LENGTH)) for name, node in vars(model).items()
                     if isinstance(node, nnx.Module) and hasattr(node, SCAN_LENGTH)))

  def __bool__(self) -> bool:
    return bool(self.stacks)

  def view(self, tree: Any, take: Callable[[Any, int], Any] = lambda leaf, i: leaf[i]) -> Any:
    """The unrolled form of a nested-dict tree (parameters, gradients, shardings, shapes): each stacked entry
    {name: {...: (L, ...)}} becomes {name: {0: {...}, ..., L-1: {...}}}, leaf i being `take(leaf, i)`."""
    if not self.stacks:
      return tree
    tree = dict(tree)
    for name, length in self.stacks:
      if name in tree:
        tree[name] = {i: jax.tree.map(lambda leaf, i=i: take(leaf, i), tree[name]) for i in range(length)}
    return tree

  def unview(self, tree: Any) -> Any:
    """Inverse of `view` for arrays: the per-layer entries stacked again along a new leading axis."""
    if not self.stacks:
      return tree
    tree = dict(tree)
    for name, length in self.stacks:
      if name in tree:
        tree[name] = jax.tree.map(lambda *layers: jnp.stack(layers), *[tree[name][i] for i in range(length)])
    return tree

  def with_segments(self, strategy, decays: Callable[[str], bool] = lambda path: True) -> "Layout":
    """This layout with optimizer segments: maximal runs of layers whose every parameter has the same treatment
    under `strategy` (a `strategy.Strategy` over unrolled paths) in every phase, and the same weight decay
    (`decays(path)`: config.optimizer.no_decay may name layers)."""
    if not self.stacks:
      return self
    phases = range(len(strategy.phases))
    trainable = [strategy.trainable(q) for q in phases]

    def treatment(name: str, layer: int) -> tuple:
      prefix = f"{name}/{layer}/"
      result = []
      for path in sorted(p for p in strategy.group_of if p.startswith(prefix)):
        label = None if path in strategy.frozen else strategy.label(path)
        result.append((path[len(prefix):], label is None or label.endswith(":bn"), decays(path),
                       None if label is None else strategy.peak_lr(path),
                       tuple(strategy.label_start(label, q) if path in trainable[q] else -1 for q in phases)))
      return tuple(result)

    segments = []
    for name, length in self.stacks:
      bounds, start = [], 0
      for layer in range(1, length + 1):
        if layer == length or treatment(name, layer) != treatment(name, start):
          bounds.append((start, layer))
          start = layer
      segments.append((name, tuple(bounds)))
    return dataclasses.replace(self, segments=tuple(segments))

  def _bounds(self, name: str, length: int) -> tuple[tuple[int, int], ...]:
    return dict(self.segments).get(name, tuple((i, i + 1) for i in range(length)))

  def opt_view(self, tree: Any, take: Callable[[Any, int, int], Any] = lambda leaf, a, b: leaf[a:b]) -> Any:
    """The optimizer's form of a nested-dict tree: each stacked entry {name: {...: (L, ...)}} becomes
    {name: {'a-(b-1)': {...: take(leaf, a, b)}, ...}}, one entry per segment."""
    if not self.stacks:
      return tree
    tree = dict(tree)
    for name, length in self.stacks:
      if name in tree:
        tree[name] = {f"{a}-{b - 1}": jax.tree.map(lambda leaf, a=a, b=b: take(leaf, a, b), tree[name])
                      for a, b in self._bounds(name, length)}
    return tree

  def opt_unview(self, tree: Any) -> Any:
    """Inverse of `opt_view` for arrays: segments concatenated along the layer axis."""
    if not self.stacks:
      return tree
    tree = dict(tree)
    for name, length in self.stacks:
      if name in tree:
        parts = [tree[name][f"{a}-{b - 1}"] for a, b in self._bounds(name, length)]
        tree[name] = parts[0] if len(parts) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
    return tree

  def opt_view_shapes(self, shapes: Any) -> Any:
    return self.opt_view(shapes, lambda leaf, a, b: jax.ShapeDtypeStruct((b - a, *leaf.shape[1:]), leaf.dtype))

  def opt_view_shardings(self, shardings: Any) -> Any:
    return self.opt_view(shardings, lambda sharding, a, b: sharding)  # the layer axis is never split

  def path_of(self, opt_path: str) -> str:
    """The unrolled parameter path whose label an optimizer-view path takes: 'layers/4-7/x' -> 'layers/4/x'."""
    parts = opt_path.split("/")
    if len(parts) > 2 and parts[0] in dict(self.stacks) and "-" in parts[1]:
      parts[1] = parts[1].split("-")[0]
    return "/".join(parts)

  def stored_paths(self, unrolled_paths: frozenset[str]) -> frozenset[str]:
    """The stored parameter paths holding `unrolled_paths` (`layers/3/x/kernel` -> `layers/x/kernel`)."""
    stacked = {name for name, _ in self.stacks}
    result = set()
    for path in unrolled_paths:
      parts = path.split("/")
      if len(parts) > 2 and parts[0] in stacked and parts[1].isdigit():
        path = "/".join([parts[0], *parts[2:]])
      result.add(path)
    return frozenset(result)

  def view_shardings(self, shardings: Any) -> Any:
    return self.view(shardings, lambda s, _: NamedSharding(s.mesh, P(*s.spec[1:])))

  def view_shapes(self, shapes: Any) -> Any:
    return self.view(shapes, lambda leaf, _: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype))

  def write(self, directory: str) -> None:
    """Records the stacks (none when unscanned) and the checkpoint format next to a run's checkpoints, read back by
    `unroll_checkpoint` and `stored_format`. Replaces what an earlier attempt that wrote no checkpoint left (its
    stacks would unroll this run's arrays); a run resumed over checkpoints keeps their format, which is theirs."""
    if jax.process_index() != 0:
      return
    os.makedirs(directory, exist_ok=True)
    has_checkpoints = any(name.isdigit() for name in os.listdir(directory))
    files.write_text(os.path.join(directory, LAYOUT_FILE), json.dumps({
        "format": stored_format(directory) if has_checkpoints else FORMAT,
        "stacks": [list(s) for s in self.stacks]}))


def stored_format(checkpoints_dir: str) -> int:
  """The format (FORMAT) of the checkpoints in `checkpoints_dir`, from its LAYOUT_FILE."""
  path = os.path.join(checkpoints_dir, LAYOUT_FILE)
  if not os.path.isfile(path):
    return 1
  return format_number(read_json(path), path, "copy it from the run that wrote the checkpoints beside it")


def format_number(record: dict[str, Any], path: str, fix: str) -> int:
  """`record`'s "format" (1 where absent: written before formats were recorded), read from file `path`."""
  value = record.get("format", 1)
  if type(value) is not int:  # pylint: disable=unidiomatic-typecheck  (not a bool either)
    raise FinetuneError(f"{path} is damaged (format {value!r}, not a number); {fix}")
  return value


def unroll_checkpoint(arrays: dict[str, dict[str, np.ndarray]], checkpoints_dir: str) -> dict[str, dict[str, Any]]:
  """Flat checkpoint arrays ({collection: {path: array}}) in the unrolled layout, whichever way they were saved."""
  layout_path = os.path.join(checkpoints_dir, LAYOUT_FILE)
  if not os.path.isfile(layout_path):
    return arrays
  stacks = dict(read_json(layout_path).get("stacks") or ())
  result = {}
  for collection, flat in arrays.items():
    if not isinstance(flat, dict):
      result[collection] = flat
      continue
    unrolled = {}
    for path, value in flat.items():
      head, _, rest = path.partition("/")
      if head in stacks and rest:
        if np.shape(value)[:1] != (stacks[head],):
          raise FinetuneError(f"checkpoint array {path!r} has shape {np.shape(value)} but {layout_path} records "
                              f"{stacks[head]} stacked layers; the checkpoint is damaged")
        unrolled.update({f"{head}/{i}/{rest}": value[i] for i in range(stacks[head])})
      else:
        unrolled[path] = value
    result[collection] = unrolled
  return result
