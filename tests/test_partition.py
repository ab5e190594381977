"""Parameter paths: '/'-joined keys, path-aware tree maps and regex masks."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.errors import FinetuneError
from finetune.partition import flatten, map_with_path, path_str, regex_mask, require_matches


def _tree() -> dict:
  return {
      "head": {"bias": np.zeros(3), "kernel": np.ones((4, 3))},
      "stages": {0: {"conv": {"kernel": np.full((2, 2), 2.0)}}, 1: {"conv": {"kernel": np.full((2, 2), 3.0)}}},
      "stem": {"norm": {"scale": np.ones(4)}},
  }


def test_flatten_joins_keys_with_slash_including_int_keys():
  flat = flatten(_tree())
  assert list(flat) == ["head/bias", "head/kernel", "stages/0/conv/kernel", "stages/1/conv/kernel",
                        "stem/norm/scale"]
  assert flat["stages/1/conv/kernel"][0, 0] == 3.0
  assert flat["head/kernel"].shape == (4, 3)


def test_flatten_sequence_indices():
  flat = flatten({"blocks": [np.float32(1), (np.float32(2), np.float32(3))]})
  assert flat == {"blocks/0": 1.0, "blocks/1/0": 2.0, "blocks/1/1": 3.0}


def test_path_str_of_empty_path_is_empty():
  assert path_str(()) == ""


def test_map_with_path_passes_path_and_keeps_structure():
  seen = []

  def fn(path, leaf):
    seen.append(path)
    return f"{path}:{leaf.shape}"

  result = map_with_path(fn, _tree())
  assert sorted(seen) == sorted(flatten(_tree()))
  assert result["stages"][0]["conv"]["kernel"] == "stages/0/conv/kernel:(2, 2)"
  assert result["head"]["bias"] == "head/bias:(3,)"


def test_map_with_path_over_several_trees():
  a = {"x": np.float32(1.0), "y": {"z": np.float32(2.0)}}
  b = {"x": np.float32(10.0), "y": {"z": np.float32(20.0)}}
  result = map_with_path(lambda path, u, v: (path, float(u + v)), a, b)
  assert result == {"x": ("x", 11.0), "y": {"z": ("y/z", 22.0)}}


def test_regex_mask_marks_matching_leaves():
  mask = regex_mask(_tree(), [r"(^|/)bias$", r"(^|/)scale$"], "test.no_decay")
  assert flatten(mask) == {"head/bias": True, "head/kernel": False, "stages/0/conv/kernel": False,
                           "stages/1/conv/kernel": False, "stem/norm/scale": True}


def test_regex_mask_uses_search_not_match():
  # Unanchored patterns match anywhere in the path; '^' anchors to the root.
  mask = flatten(regex_mask(_tree(), ["conv"], "what"))
  assert [p for p, v in mask.items() if v] == ["stages/0/conv/kernel", "stages/1/conv/kernel"]
  anchored = flatten(regex_mask(_tree(), ["^stages/1/"], "what"))
  assert [p for p, v in anchored.items() if v] == ["stages/1/conv/kernel"]


def test_regex_mask_without_patterns_is_all_false():
  assert not any(flatten(regex_mask(_tree(), [], "what")).values())


def test_regex_mask_unmatched_pattern_errors_unless_allowed():
  with pytest.raises(FinetuneError, match=r"config\.freeze: pattern '\^decoder/' matches no parameter"):
    regex_mask(_tree(), ["^head/", "^decoder/"], "config.freeze")
  mask = regex_mask(_tree(), ["^decoder/"], "config.freeze", require_match=False)
  assert not any(flatten(mask).values())


def test_regex_mask_invalid_regex_names_pattern():
  with pytest.raises(FinetuneError, match=r"config\.freeze: '\(head' is not a valid regex"):
    regex_mask(_tree(), ["(head"], "config.freeze", require_match=False)


def test_require_matches_names_first_unmatched_pattern_and_shows_paths():
  paths = list(flatten(_tree()))
  require_matches(["^head/", "kernel$"], paths, "what")  # All match: no error.
  with pytest.raises(FinetuneError) as info:
    require_matches(["^head/", "^nope", "^neither"], paths, "config.lr_groups")
  message = str(info.value)
  assert "config.lr_groups: pattern '^nope' matches no parameter" in message
  assert "^neither" not in message
  assert "head/bias, head/kernel, stages/0/conv/kernel, stages/1/conv/kernel, ..." in message


def test_require_matches_short_path_list_has_no_ellipsis():
  with pytest.raises(FinetuneError) as info:
    require_matches(["x"], ["a/b", "c"], "what")
  assert str(info.value).endswith("parameter paths look like a/b, c")


def test_require_matches_invalid_regex():
  with pytest.raises(FinetuneError, match=r"'\[' is not a valid regex"):
    require_matches(["["], ["a"], "what")
