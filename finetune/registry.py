"""Name -> factory tables for models, data sources and (later) methods.

A registry refuses a second entry under a taken name (a programming error, raised at import time) and, on a
miss, lists every valid name so a config typo is fixed in one try.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from finetune.errors import FinetuneError

T = TypeVar("T")


class Registry(Generic[T]):
  """Maps names to objects of one kind (e.g. 'model' -> nnx.Module classes)."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator: `@MODELS.register('cnn')` on a class or function."""

    def add(entry: T) -> T:
      if name in self._entries:
        raise ValueError(
            f"duplicate {self.kind} name {name!r}: already registered by {self._entries[name]!r}")
      self._entries[name] = entry
      return entry

    return add

  def get(self, name: str) -> T:
    if name not in self._entries:
      close = difflib.get_close_matches(name, self._entries, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise FinetuneError(
          f"unknown {self.kind} {name!r}{hint}; valid {self.kind} names: {', '.join(sorted(self._entries))}")
    return self._entries[name]

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries
