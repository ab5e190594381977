"""finetune/compile_cache.py: where `finetune train` keeps compiled programs, and that a second process reuses them."""

from __future__ import annotations

import os

import pytest

from conftest import run_python
from finetune import compile_cache


@pytest.fixture
def recorded(monkeypatch):
  """jax.config.update calls, recorded instead of changing this test process's cache."""
  calls = []
  monkeypatch.setattr(compile_cache.jax.config, "update", lambda name, value: calls.append((name, value)))
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  return calls


def test_default_folder_follows_xdg_cache_home(recorded, monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compile_cache.enable() == str(tmp_path / "finetune" / "jax")
  assert recorded == [("jax_compilation_cache_dir", str(tmp_path / "finetune" / "jax"))]


def test_env_chooses_the_folder_or_turns_it_off(recorded, monkeypatch, tmp_path):
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
  assert compile_cache.enable() == str(tmp_path / "mine")
  for off in ("off", "0", ""):
    monkeypatch.setenv(compile_cache.ENV, off)
    assert compile_cache.enable() is None
  assert recorded == [("jax_compilation_cache_dir", str(tmp_path / "mine"))]


def test_a_folder_jax_was_given_wins(recorded, monkeypatch, tmp_path):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax's"))
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
  assert compile_cache.enable() == str(tmp_path / "jax's") and recorded == []


def test_a_second_process_loads_the_program_the_first_compiled(tmp_path):
  # jax.random.normal takes seconds to compile on CPU, over JAX's 1 s threshold for storing a program.
  code = """
import logging
from finetune import compile_cache
import jax
logging.basicConfig()
logging.getLogger("jax._src.compiler").setLevel(logging.DEBUG)  # where JAX reports persistent-cache hits
print("cache", compile_cache.enable())
jax.jit(lambda key: jax.random.normal(key, (3, 3, 3, 4))).lower(jax.random.PRNGKey(0)).compile()
"""
  cache = tmp_path / "cache"
  env = {compile_cache.ENV: str(cache), "JAX_COMPILATION_CACHE_DIR": ""}
  first = run_python(code, env)
  assert first.returncode == 0, first.stderr
  assert f"cache {cache}" in first.stdout and os.listdir(cache), first.stdout
  assert "Persistent compilation cache hit" not in first.stderr
  second = run_python(code, env)
  assert second.returncode == 0, second.stderr
  assert "Persistent compilation cache hit for 'jit__lambda'" in second.stderr, second.stderr[-2000:]
