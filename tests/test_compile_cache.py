"""finetune/compile_cache.py: where `finetune train` keeps compiled programs, and that a second process reuses them."""

from __future__ import annotations

import os

import pytest

from conftest import run_python
from finetune import compile_cache


@pytest.fixture
def config_updates(monkeypatch):
  """jax.config.update calls, recorded instead of changing this test process's cache."""
  calls = []
  monkeypatch.setattr(compile_cache.jax.config, "update", lambda name, value: calls.append((name, value)))
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.delenv(compile_cache.CACHE_DIR_VARIABLE, raising=False)
  return calls


def test_default_folder_follows_xdg_cache_home(config_updates, monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  for unset in (None, "", "  "):  # an empty variable counts as unset, for both variables
    if unset is not None:
      monkeypatch.setenv(compile_cache.CACHE_DIR_VARIABLE, unset)
      monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", unset)
    assert compile_cache.enable() == str(tmp_path / "finetune" / "jax")
  assert config_updates == [("jax_compilation_cache_dir", str(tmp_path / "finetune" / "jax"))] * 3


def test_env_chooses_the_folder_or_turns_it_off(config_updates, monkeypatch, tmp_path):
  monkeypatch.setenv(compile_cache.CACHE_DIR_VARIABLE, str(tmp_path / "mine"))
  assert compile_cache.enable() == str(tmp_path / "mine")
  for off in ("off", "OFF", "0", "false"):
    monkeypatch.setenv(compile_cache.CACHE_DIR_VARIABLE, off)
    assert compile_cache.enable() is None
  assert config_updates == [("jax_compilation_cache_dir", str(tmp_path / "mine"))]


def test_what_jax_was_told_wins(config_updates, monkeypatch, tmp_path):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax's"))
  monkeypatch.setenv(compile_cache.CACHE_DIR_VARIABLE, str(tmp_path / "mine"))
  assert compile_cache.enable() == str(tmp_path / "jax's") and config_updates == []


def test_jaxs_own_off_switch_wins(monkeypatch, tmp_path):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path))  # so a failing enable() changes nothing here
  was = compile_cache.jax.config.jax_enable_compilation_cache
  compile_cache.jax.config.update("jax_enable_compilation_cache", False)  # as JAX_ENABLE_COMPILATION_CACHE=false
  try:
    assert compile_cache.enable() is None
  finally:
    compile_cache.jax.config.update("jax_enable_compilation_cache", was)


def test_several_cpu_devices_keep_the_cache_off(config_updates, monkeypatch, tmp_path):
  """Loaded multi-device CPU programs can hang (finetune/host_devices.py): off, even where jax was given a folder."""
  monkeypatch.setattr(compile_cache.host_devices, "several_cpu_devices", lambda: True)
  assert compile_cache.enable() is None
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path))
  assert compile_cache.enable() is None
  assert config_updates == [("jax_enable_compilation_cache", False)] * 2


def test_a_second_process_loads_the_program_the_first_compiled(tmp_path):
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
  # Store every program whatever its compile time (JAX's default threshold is 1 s, machine-dependent).
  env = {compile_cache.CACHE_DIR_VARIABLE: str(cache), "JAX_COMPILATION_CACHE_DIR": "",
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  first = run_python(code, env)
  assert first.returncode == 0, first.stderr
  assert f"cache {cache}" in first.stdout and os.listdir(cache), first.stdout
  assert "Persistent compilation cache hit" not in first.stderr
  second = run_python(code, env)
  assert second.returncode == 0, second.stderr
  assert "Persistent compilation cache hit for 'jit__lambda'" in second.stderr, second.stderr[-2000:]
