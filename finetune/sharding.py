"""Device mesh from config and the one mapping from logical axis names to mesh axes.

Model code names logical axes only ('embed', 'mlp', 'conv_out', ...; see models/layers.py). `config.mesh` gives
the mesh shape over named axes (default: every device on 'data'), and `config.sharding_rules` (a tuple of
(logical name, mesh axis or axes or None)) overrides `DEFAULT_RULES` name by name. Batches are split over the
data-parallel axes ('data' and 'fsdp': FSDP shards parameters *and* the batch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from finetune import host_devices
from finetune.errors import FinetuneError
from finetune.models.layers import LAYER_AXIS
from finetune.partition import flatten, map_with_path, path_str

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")

# Parameters: FSDP shards the model-width axes, tensor parallelism the hidden/head axes. A rule for a name that is
# missing here leaves that axis replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),  # (what batch_sharding does; a config rule for it is refused: check_rule_names)
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # Llama's key/value projections (grouped-query: fewer heads than the queries')
    ("vocab", "tensor"),
)

# Activations have their own names and rules (as in MaxText/Levanter), so that parameter and activation layouts
# change independently. Models constrain the residual stream (B, L, hidden) to `BLOCK_ACTIVATION` at every block
# boundary (models.layers.run_blocks). The default keeps the batch split over the data-parallel axes, the length
# over 'sequence' and the hidden width replicated (Megatron-style tensor parallelism: each tensor-parallel group
# holds whole activations between blocks).
DEFAULT_ACTIVATION_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", "sequence"),
    ("activation_embed", None),
)
BLOCK_ACTIVATION = ("activation_batch", "activation_length", "activation_embed")

Rules = dict[str, Any]


def make_mesh(mesh_cfg: ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) shaped by `config.mesh`; one axis may be -1 (= the remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  host_devices.warn_if_short_of_threads(devices)
  host_devices.warn_if_cache_is_on(devices)
  names = [axis for axis in MESH_AXES if axis in mesh_cfg]
  sizes = [int(mesh_cfg[axis]) for axis in names]
  for name, size in zip(names, sizes):
    if size != -1 and size < 1:
      raise FinetuneError(f"config.mesh.{name}={size}: a mesh axis size must be -1 (all remaining devices) or >= 1")
  if sizes.count(-1) > 1:
    filled = [name for name, size in zip(names, sizes) if size == -1]
    raise FinetuneError(f"config.mesh.{' and config.mesh.'.join(filled)} are all -1, and only one axis may take "
                        "the remaining devices (data is -1 by default): set the others, e.g. config.mesh.data=1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise FinetuneError(f"config.mesh {dict(zip(names, sizes))} does not divide {len(devices)} devices; "
                          f"make the fixed axis sizes divide {len(devices)}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    # (A fix that works here: an axis that can take the remaining devices, given the others.)
    takers = [(name, len(devices) // (math.prod(sizes) // size)) for name, size in zip(names, sizes)
              if len(devices) % (math.prod(sizes) // size) == 0]
    fix = (f"e.g. --config.mesh.{takers[0][0]}=-1, which makes it {takers[0][1]}" if takers else
           f"make their product {len(devices)}")
    raise FinetuneError(f"config.mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices but "
                        f"{len(devices)} are available; set one axis to -1 or change the sizes ({fix}; a run may "
                        "resume, and be evaluated or exported, on another mesh)")
  return Mesh(np.asarray(devices).reshape(sizes), tuple(names))


def rules_from_config(sharding_rules: Sequence[Sequence[Any]], defaults: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                      key: str = "sharding_rules") -> Rules:
  """`defaults` overridden name by name by `config.<key>` entries (logical name, mesh axis or axes or None)."""
  rules = dict(defaults)
  for rule in sharding_rules:
    if len(rule) != 2:
      raise FinetuneError(f"config.{key} entry {rule!r} must be (logical_name, mesh_axis_or_axes_or_None)")
    name, target = rule
    for axis in (target if isinstance(target, (tuple, list)) else (target,)):
      if axis is not None and axis not in MESH_AXES:
        raise FinetuneError(f"config.{key} maps {name!r} to unknown mesh axis {axis!r}; "
                            f"valid: {', '.join(MESH_AXES)}")
    rules[name] = tuple(target) if isinstance(target, list) else target
  return rules


def check_rule_names(sharding_rules: Sequence[Sequence[Any]], abstract_state: Any) -> None:
  """A rule naming an axis no parameter has does nothing: a misspelt name would otherwise leave the intended axis
  at its default silently."""
  used = sorted({name for names in logical_axes(abstract_state).values() for name in names if name})
  for rule in sharding_rules:
    if rule[0] == "batch":
      raise FinetuneError("config.sharding_rules cannot place the batch: batches are always split over the "
                          f"data-parallel mesh axes ({', '.join(BATCH_AXES)}); size those in config.mesh")
    if rule[0] == LAYER_AXIS:
      # Optimizer segments of a layer-dependent strategy (frozen-n, per-layer rates) hold a few layers each, and the
      # per-layer view must match the unrolled layout: the stack's axis stays whole (it failed inside jax before).
      raise FinetuneError(f"config.sharding_rules cannot split {LAYER_AXIS!r}, the stacked axis of scanned layers: "
                          "each device holds every layer; shard the layers' own axes (e.g. 'embed' over fsdp)")
    if rule[0] in dict(DEFAULT_ACTIVATION_RULES):
      raise FinetuneError(f"config.sharding_rules names {rule[0]!r}, an activation axis: place it in "
                          "config.activation_rules (sharding_rules places parameters)")
    if rule[0] not in used:
      raise FinetuneError(f"config.sharding_rules names logical axis {rule[0]!r}, which no parameter of this model "
                          f"has; its parameters' axes: {', '.join(a for a in used if a != LAYER_AXIS)}")


def activation_rules_from_config(activation_rules: Sequence[Sequence[Any]]) -> Rules:
  rules = rules_from_config(activation_rules, DEFAULT_ACTIVATION_RULES, "activation_rules")
  unknown = sorted(set(rules) - {name for name, _ in DEFAULT_ACTIVATION_RULES})
  if unknown:
    raise FinetuneError(f"config.activation_rules names unknown activation axis {unknown[0]!r}; valid: "
                        f"{', '.join(name for name, _ in DEFAULT_ACTIVATION_RULES)}")
  return rules


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
  """The mesh and activation rules a model constrains its block-boundary activations with (hashable: it is a
  static attribute of the model, set from config by the train stage)."""

  mesh: Mesh
  rules: tuple[tuple[str, Any], ...]

  def constrain(self, x: jax.Array, logical: Sequence[str | None] = BLOCK_ACTIVATION) -> jax.Array:
    spec = logical_to_spec(logical, x.shape, self.mesh, dict(self.rules))
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
  """The PartitionSpec for one array: each logical name mapped through `rules`.

  An axis stays replicated when its size is not divisible by the mesh axes (tiny heads, odd channel counts) or
  when those mesh axes are already used by an earlier dimension of the same array.
  """
  used: set[str] = set()
  spec = []
  for name, size in zip(logical, shape):
    target = rules.get(name) if name is not None else None
    axes = tuple(a for a in ((target,) if isinstance(target, str) else (target or ())) if a in mesh.shape)
    axes = tuple(a for a in axes if a not in used)
    devices = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if not axes or devices == 1 or size % devices:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def logical_axes(abstract_state: nnx.State) -> dict[str, tuple[str | None, ...]]:
  """{parameter path: logical axis names} from the variables' sharding metadata (absent -> all None)."""
  result = {}
  for keys, variable in nnx.to_flat_state(abstract_state):
    metadata = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    names = metadata.get("out_sharding") or metadata.get("sharding_names") or metadata.get("sharding")
    shape = variable.get_value().shape if hasattr(variable, "get_value") else variable.value.shape
    result[path_str(keys)] = tuple(names) if names else (None,) * len(shape)
  return result


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for the pure-dict form of `abstract_state` (an `nnx.State` from `nnx.eval_shape`)."""
  axes = logical_axes(abstract_state)
  pure = abstract_state.to_pure_dict()
  return map_with_path(lambda path, leaf: NamedSharding(mesh, logical_to_spec(axes[path], leaf.shape, mesh, rules)),
                       pure)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis split over the data-parallel mesh axes."""
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.shape)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_host(tree: Any) -> Any:
  """Numpy copies of every array in `tree`, whole, on every process. `jax.device_get` cannot fetch an array that
  spans other processes' devices (FSDP across hosts); `process_allgather` can, and is a collective: every process
  must call this, even one that then discards the copy."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def describe(shardings: Any) -> dict[str, str]:
  """{path: 'P(...)'} for logs and tests."""
  return {path: str(s.spec) for path, s in flatten(shardings).items()}


def optimizer_state_shardings(abstract_opt_state: Any, params_sharding: Any, abstract_params: Any,
                              mesh: Mesh) -> Any:
  """Shardings for an optimizer state: moments like their parameters, everything else (counts) replicated.

  A moment is recognised by its path ending in a parameter's path with the parameter's shape (optax states mirror
  the params tree, under `optax.partition` with other labels' leaves masked out), which `optax.tree_map_params`
  cannot match through the masks.
  """
  shardings = flatten(params_sharding)
  shapes = {path: tuple(leaf.shape) for path, leaf in flatten(abstract_params).items()}

  def for_leaf(path: str, leaf: Any) -> NamedSharding:
    parts = path.split("/")
    for start in range(len(parts)):
      suffix = "/".join(parts[start:])
      if suffix in shardings and shapes[suffix] == tuple(leaf.shape):
        return shardings[suffix]
    return replicated(mesh)

  return map_with_path(for_leaf, abstract_opt_state)
