"""Registry: a taken name is refused; a miss lists every valid name and suggests the closest one."""

from __future__ import annotations

import re

import pytest

from finetune.errors import FinetuneError
from finetune.registry import Registry


def _registry() -> Registry:
  registry = Registry("widget")
  for name in ("alpha", "beta", "gamma"):
    registry.register(name)(lambda name=name: name)
  return registry


def test_register_returns_entry_and_get_finds_it():
  registry = Registry("widget")

  @registry.register("thing")
  def thing():
    return 42

  assert thing() == 42  # The decorator hands the entry back unchanged.
  assert registry.get("thing") is thing
  assert "thing" in registry
  assert "other" not in registry


def test_names_are_sorted():
  registry = Registry("widget")
  for name in ("zeta", "alpha", "mu"):
    registry.register(name)(object())
  assert registry.names() == ["alpha", "mu", "zeta"]


def test_duplicate_name_raises_value_error():
  registry = _registry()
  first = registry.get("beta")
  with pytest.raises(ValueError, match=r"duplicate widget name 'beta'"):
    registry.register("beta")(lambda: "second")
  assert registry.get("beta") is first  # The original entry survives.


def test_miss_lists_all_valid_names_and_suggests_closest():
  registry = _registry()
  with pytest.raises(FinetuneError) as info:
    registry.get("gamm")
  message = str(info.value)
  assert "unknown widget 'gamm'" in message
  assert "did you mean 'gamma'?" in message
  assert "valid widget names: alpha, beta, gamma" in message


def test_miss_without_close_match_has_no_hint():
  registry = _registry()
  with pytest.raises(FinetuneError) as info:
    registry.get("xyzzy")
  message = str(info.value)
  assert "did you mean" not in message
  assert re.search(r"valid widget names: alpha, beta, gamma$", message)


def test_finetune_error_is_not_a_value_error():
  # The CLI turns FinetuneError into a one-line user error; a duplicate registration is a programming bug.
  assert not issubclass(FinetuneError, ValueError)
  assert not issubclass(ValueError, FinetuneError)
