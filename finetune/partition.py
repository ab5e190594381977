"""Parameter paths: the one vocabulary that every fine-tuning choice is written in.

A parameter's path is `'/'.join` of its keys in the params pytree (nested dicts from `nnx.State.to_pure_dict`),
e.g. `stages/1/conv/kernel` or `head/bias`. Config regexes are matched against these paths with `re.search`
anchored by the user (write `^head/` to mean the head only).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax

from finetune.errors import FinetuneError


def key_name(key: Any) -> str:
  """The text of one pytree path entry (dict key, sequence index or attribute)."""
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(keypath: Sequence[Any]) -> str:
  return "/".join(key_name(k) for k in keypath)


def flatten(tree: Any) -> dict[str, Any]:
  """{'/'-joined path: leaf} in pytree order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_str(keypath): leaf for keypath, leaf in leaves}


def map_with_path(fn: Callable[[str, Any], Any], tree: Any, *rest: Any) -> Any:
  """`jax.tree.map` whose function also receives the leaf's '/'-joined path."""
  return jax.tree_util.tree_map_with_path(lambda keypath, *leaves: fn(path_str(keypath), *leaves), tree, *rest)


def regex_mask(tree: Any, patterns: Sequence[str], what: str, require_match: bool = True) -> Any:
  """A bool pytree: True where the leaf's path matches any of `patterns` (re.search).

  A pattern that matches no parameter is an error (it is almost always a typo) when `require_match`.
  """
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise FinetuneError(f"{what}: {pattern!r} is not a valid regex ({e}); fix the pattern") from None
  if require_match:
    require_matches(patterns, list(flatten(tree)), what)
  return map_with_path(lambda path, _: any(r.search(path) for r in compiled), tree)


def require_matches(patterns: Sequence[str], paths: Sequence[str], what: str) -> None:
  """Raises naming the first pattern that matches none of `paths`."""
  for pattern in patterns:
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise FinetuneError(f"{what}: {pattern!r} is not a valid regex ({e}); fix the pattern") from None
    if not any(regex.search(p) for p in paths):
      raise FinetuneError(f"{what}: pattern {pattern!r} matches no parameter; parameter paths look like "
                          f"{', '.join(paths[:4])}{', ...' if len(paths) > 4 else ''}")


def assign_groups(paths: Sequence[str], groups: Sequence[tuple[str, str]], source: str) -> dict[str, str]:
  """{path: group name}: every parameter in exactly one group, every group matching at least one parameter.

  `groups` is the ordered [(name, regex)] list (input to output) from the model or from `config.groups`.
  """
  compiled = []
  names = [name for name, _ in groups]
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:  # (rates, freezing and unfreezing go by name: two groups of one name got each other's)
    raise FinetuneError(f"{source}: group name(s) {', '.join(map(repr, repeated))} used more than once; group names "
                        "must be unique")
  for name, pattern in groups:
    # Optimizer labels are a group's name, 'name*multiplier' or 'name:bn', and 'frozen' is the frozen parameters'
    # label: a group named so would share an optimizer entry with another.
    if name == "frozen" or "*" in name or ":" in name:
      raise FinetuneError(f"{source}: group name {name!r} is reserved or holds '*' or ':' (optimizer labels are "
                          "built from group names); rename the group")
    try:
      compiled.append((name, re.compile(pattern)))
    except re.error as e:
      raise FinetuneError(f"{source}: group {name!r} has an invalid regex {pattern!r} ({e})") from None
  group_of: dict[str, str] = {}
  for path in paths:
    matches = [name for name, regex in compiled if regex.search(path)]
    if not matches:
      raise FinetuneError(f"{source}: parameter {path!r} is in no layer group; add a group whose regex matches it")
    if len(matches) > 1:
      raise FinetuneError(f"{source}: parameter {path!r} is in several groups ({', '.join(matches)}); make the "
                          "group regexes disjoint")
    group_of[path] = matches[0]
  for name, _ in groups:
    if name not in group_of.values():
      raise FinetuneError(f"{source}: group {name!r} matches no parameter; parameter paths look like "
                          f"{', '.join(list(paths)[:4])}")
  return group_of


def select(tree: Any, keep: Callable[[str], bool]) -> Any:
  """`tree` with the leaves whose path fails `keep` replaced by None (an empty subtree to jax and optax)."""
  return map_with_path(lambda path, leaf: leaf if keep(path) else None, tree)


def combine(template: Any, *parts: Any) -> Any:
  """The tree shaped like `template` taking each leaf from the first of `parts` that has it (not None)."""
  flats = [flatten(part) for part in parts]

  def pick(path: str, _):
    for flat in flats:
      if flat.get(path) is not None:
        return flat[path]
    raise KeyError(path)

  return map_with_path(pick, template)
