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
