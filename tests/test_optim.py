"""build_optimizer: weight-decay mask, schedules against their closed forms, clipping, SGD momentum, names."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from finetune.config import defaults
from finetune.errors import FinetuneError
from finetune import optim
from finetune.optim import OPTIMIZERS, SCHEDULES
from finetune.strategy import Strategy


def build_optimizer(cfg, total_steps, params):
  """One group holding every parameter: (transform, learning rate as a function of the step)."""
  transform, lr_by_label = optim.build_optimizer(cfg, Strategy.single_group(params, cfg.learning_rate), 0,
                                                 total_steps, params)
  return transform, lr_by_label["all"]


def _cfg(**overrides):
  cfg = defaults().optimizer
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _params() -> dict:
  rng = np.random.default_rng(0)
  return {
      "dense": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "bias": jnp.ones(4)},
      "norm": {"scale": jnp.full(4, 2.0), "bias": jnp.full(4, 0.5)},
      "head": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32), "bias": jnp.full(2, -1.0)},
  }


def _apply(transform, params, grads_list):
  state = transform.init(params)
  for grads in grads_list:
    updates, state = transform.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def _close(a, b, rtol=1e-6, atol=1e-7):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------------ weight decay


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_weight_decay_applies_to_kernels_not_biases_or_scales(name):
  lr, wd = 0.1, 0.5
  cfg = _cfg(name=name, schedule="constant", learning_rate=lr, weight_decay=wd, momentum=0.0)
  params = _params()
  transform, _ = build_optimizer(cfg, total_steps=10, params=params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  new = _apply(transform, params, [zeros])
  # Zero gradients: only decoupled (adamw) / coupled (sgd) weight decay moves a parameter: p <- p - lr*wd*p.
  for group in ("dense", "head"):
    _close(new[group]["kernel"], params[group]["kernel"] * (1 - lr * wd))
    assert not np.allclose(new[group]["kernel"], params[group]["kernel"])
    _close(new[group]["bias"], params[group]["bias"])
  _close(new["norm"]["scale"], params["norm"]["scale"])
  _close(new["norm"]["bias"], params["norm"]["bias"])


def test_no_decay_patterns_come_from_config():
  cfg = _cfg(schedule="constant", learning_rate=0.1, weight_decay=0.5, no_decay=(r"^head/",))
  params = _params()
  transform, _ = build_optimizer(cfg, total_steps=10, params=params)
  new = _apply(transform, params, [jax.tree.map(jnp.zeros_like, params)])
  _close(new["head"]["kernel"], params["head"]["kernel"])  # Excluded by the custom pattern.
  _close(new["head"]["bias"], params["head"]["bias"])
  _close(new["dense"]["bias"], params["dense"]["bias"] * 0.95)  # No longer excluded.
  _close(new["norm"]["scale"], params["norm"]["scale"] * 0.95)


def test_zero_weight_decay_leaves_params_unchanged_with_zero_grads():
  params = _params()
  transform, _ = build_optimizer(_cfg(weight_decay=0.0), total_steps=10, params=params)
  new = _apply(transform, params, [jax.tree.map(jnp.zeros_like, params)])
  for path_new, path_old in zip(jax.tree.leaves(new), jax.tree.leaves(params)):
    _close(path_new, path_old)


def test_build_optimizer_accepts_abstract_params():
  params = _params()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  transform, schedule = build_optimizer(_cfg(weight_decay=0.1), total_steps=10, params=abstract)
  state = jax.eval_shape(transform.init, params)
  assert len(jax.tree.leaves(state)) > 0
  assert float(schedule(0)) == pytest.approx(1e-3)


# --------------------------------------------------------------------------------------------------- schedules

STEPS = [0, 1, 5, 9, 10, 11, 25, 50, 73, 99, 100, 150]


def _cosine(step, lr, warmup, total, end):
  if step < warmup:
    return lr * step / warmup
  decay_steps = total - warmup
  t = min(step - warmup, decay_steps) / decay_steps
  return lr * end + (lr - lr * end) * 0.5 * (1 + math.cos(math.pi * t))


def _linear(step, lr, warmup, total, end):
  if step < warmup:
    return lr * step / warmup
  t = min(step - warmup, total - warmup) / (total - warmup)
  return lr + (lr * end - lr) * t


def _constant(step, lr, warmup, total, end):
  del total, end
  return lr * step / warmup if step < warmup else lr


@pytest.mark.parametrize("name,formula", [("cosine", _cosine), ("linear", _linear), ("constant", _constant)])
@pytest.mark.parametrize("warmup,end", [(0, 0.0), (10, 0.0), (10, 0.1), (25, 0.5)])
def test_schedule_matches_closed_form(name, formula, warmup, end):
  lr, total = 0.3, 100
  cfg = _cfg(schedule=name, learning_rate=lr, warmup_steps=warmup, end_learning_rate_factor=end)
  _, schedule = build_optimizer(cfg, total_steps=total, params=_params())
  got = [float(schedule(s)) for s in STEPS]
  want = [formula(s, lr, warmup, total, end) for s in STEPS]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_schedule_is_linear_in_its_peak(name):
  # finetune.vmap trains points that differ in learning rate with one optimizer and a per-point lr_scale; that is
  # exact only if schedule(c * peak) == c * schedule(peak) at every step. A new schedule that breaks this (a
  # floor, an additive offset) fails here.
  cfg = _cfg(schedule=name, warmup_steps=10, end_learning_rate_factor=0.1)
  for scale in (0.1, 3.0):
    base = SCHEDULES.get(name)(cfg, 0.2, 100)
    scaled = SCHEDULES.get(name)(cfg, 0.2 * scale, 100)
    np.testing.assert_allclose([float(scaled(s)) for s in STEPS], [scale * float(base(s)) for s in STEPS],
                               rtol=1e-5, atol=1e-9)


def test_lr_scale_multiplies_every_update():
  params = _params()
  grads = [jax.tree.map(lambda p, i=i: jnp.sin(p + i), params) for i in range(4)]
  cfg = _cfg(schedule="cosine", learning_rate=0.03, warmup_steps=1, weight_decay=0.1)
  strategy = Strategy.single_group(params, 0.03)
  scaled, lr_scaled = optim.build_optimizer(cfg, strategy, 0, 4, params, lr_scale=jnp.float32(2.0))
  cfg_doubled = _cfg(schedule="cosine", learning_rate=0.06, warmup_steps=1, weight_decay=0.1)
  doubled, lr_doubled = optim.build_optimizer(cfg_doubled, Strategy.single_group(params, 0.06), 0, 4, params)
  jax.tree.map(lambda a, b: _close(a, b, rtol=1e-5), _apply(scaled, params, grads), _apply(doubled, params, grads))
  _close(lr_scaled["all"](2), lr_doubled["all"](2))


def test_schedule_endpoints():
  lr = 0.3
  _, cosine = build_optimizer(_cfg(schedule="cosine", learning_rate=lr, warmup_steps=10,
                                   end_learning_rate_factor=0.1), total_steps=100, params=_params())
  assert float(cosine(0)) == 0.0
  assert float(cosine(10)) == pytest.approx(lr)
  assert float(cosine(100)) == pytest.approx(0.03)
  assert float(cosine(1000)) == pytest.approx(0.03)
  _, linear = build_optimizer(_cfg(schedule="linear", learning_rate=lr), total_steps=100, params=_params())
  assert float(linear(0)) == pytest.approx(lr)
  assert float(linear(50)) == pytest.approx(lr / 2)
  assert float(linear(100)) == 0.0


def test_sgd_follows_schedule():
  # With momentum off and unit gradients, the update of step k is exactly -schedule(k).
  cfg = _cfg(name="sgd", schedule="linear", learning_rate=0.5, warmup_steps=2, momentum=0.0)
  params = {"w": jnp.zeros(())}
  transform, schedule = build_optimizer(cfg, total_steps=6, params=params)
  state = transform.init(params)
  got = []
  for _ in range(6):
    updates, state = transform.update({"w": jnp.ones(())}, state, params)
    got.append(float(updates["w"]))
  np.testing.assert_allclose(got, [-float(schedule(k)) for k in range(6)], rtol=1e-6)
  np.testing.assert_allclose(got, [0.0, -0.25, -0.5, -0.375, -0.25, -0.125], rtol=1e-6)


# ------------------------------------------------------------------------------------------ clipping, momentum


def test_grad_clipping_limits_update_norm():
  params = {"a": jnp.zeros(3), "b": jnp.zeros(4)}
  grads = {"a": jnp.array([3.0, 0.0, 0.0]), "b": jnp.array([0.0, 4.0, 0.0, 0.0])}  # Global norm 5.
  base = dict(name="sgd", schedule="constant", learning_rate=1.0, momentum=0.0)
  clipped, _ = build_optimizer(_cfg(grad_clip_norm=1.0, **base), total_steps=10, params=params)
  updates, _ = clipped.update(grads, clipped.init(params), params)
  _close(optax.global_norm(updates), 1.0)
  _close(updates["a"], [-0.6, 0.0, 0.0])
  _close(updates["b"], [0.0, -0.8, 0.0, 0.0])
  unclipped, _ = build_optimizer(_cfg(grad_clip_norm=0.0, **base), total_steps=10, params=params)
  updates, _ = unclipped.update(grads, unclipped.init(params), params)
  _close(optax.global_norm(updates), 5.0)
  # A gradient already under the limit is untouched.
  small = jax.tree.map(lambda g: g / 10, grads)
  updates, _ = clipped.update(small, clipped.init(params), params)
  _close(updates["b"], [0.0, -0.4, 0.0, 0.0])


@pytest.mark.parametrize("nesterov,expected", [(False, [1.0, 1.9, 2.71]), (True, [1.9, 2.71, 3.439])])
def test_sgd_momentum(nesterov, expected):
  lr = 0.1
  cfg = _cfg(name="sgd", schedule="constant", learning_rate=lr, momentum=0.9, nesterov=nesterov)
  params = {"w": jnp.zeros(2)}
  transform, _ = build_optimizer(cfg, total_steps=10, params=params)
  state = transform.init(params)
  grads = {"w": jnp.array([1.0, -2.0])}
  for factor in expected:
    updates, state = transform.update(grads, state, params)
    _close(updates["w"], -lr * factor * np.array([1.0, -2.0]), rtol=1e-5)


def test_sgd_without_momentum_is_plain_gradient_descent():
  cfg = _cfg(name="sgd", schedule="constant", learning_rate=0.1, momentum=0.0)
  params = {"w": jnp.zeros(2)}
  transform, _ = build_optimizer(cfg, total_steps=10, params=params)
  state = transform.init(params)
  for _ in range(3):
    updates, state = transform.update({"w": jnp.array([1.0, 2.0])}, state, params)
    _close(updates["w"], [-0.1, -0.2])


def test_adamw_first_step_is_sign_times_lr():
  cfg = _cfg(name="adamw", schedule="constant", learning_rate=0.01)
  params = {"w": jnp.zeros(3)}
  transform, _ = build_optimizer(cfg, total_steps=10, params=params)
  updates, _ = transform.update({"w": jnp.array([5.0, -0.2, 3.0])}, transform.init(params), params)
  _close(updates["w"], [-0.01, 0.01, -0.01], rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ names


def test_registered_names():
  assert OPTIMIZERS.names() == ["adamw", "sgd"]
  assert SCHEDULES.names() == ["constant", "cosine", "linear", "onecycle", "stlr"]


@pytest.mark.parametrize("key,value,expected", [
    ("name", "adam", ["unknown optimizer 'adam'", "did you mean 'adamw'?", "adamw, sgd"]),
    ("schedule", "cosin", ["unknown learning-rate schedule 'cosin'", "constant, cosine, linear, onecycle, stlr"]),
])
def test_unknown_names_list_valid_ones(key, value, expected):
  with pytest.raises(FinetuneError) as info:
    build_optimizer(_cfg(**{key: value}), total_steps=10, params=_params())
  for text in expected:
    assert text in str(info.value)


CHANGED = {"end_learning_rate_factor": 0.2, "cut_frac": 0.3, "ratio": 8.0, "pct_start": 0.4, "div_factor": 10.0,
           "final_div_factor": 100.0, "b1": 0.5, "b2": 0.9, "eps": 1e-2, "momentum": 0.5, "nesterov": True}


def test_setting_readers_says_which_built_in_schedule_and_optimizer_reads_each_key():
  """config validation refuses a key set where no stage's schedule or optimizer reads it (optim.SETTING_READERS):
  each key changes the outputs of exactly the built-ins listed as its readers."""
  assert set(CHANGED) == {key for keys in optim.SETTING_READERS.values() for key in keys}
  for key, readers in optim.SETTING_READERS["schedule"].items():
    for name in optim.BUILT_IN["schedule"]:
      rates = [np.asarray([SCHEDULES.get(name)(_cfg(**values), 1.0, 40)(step) for step in range(40)])
               for values in ({}, {key: CHANGED[key]})]
      assert (not np.allclose(*rates)) == (name in readers), (key, name)
  grads = jax.tree.map(jnp.ones_like, _params())
  for key, readers in optim.SETTING_READERS["name"].items():
    for name in optim.BUILT_IN["name"]:
      finals = []
      for values in ({}, {key: CHANGED[key]}):
        cfg = _cfg(name=name, schedule="constant", learning_rate=0.1, **values)
        transform, _ = build_optimizer(cfg, 10, _params())
        params, state = _params(), transform.init(_params())
        for scale in (1.0, -2.0, 0.5):  # (constant gradients hide Adam's b1: m / sqrt(v) is then 1 for any b1)
          updates, state = transform.update(jax.tree.map(lambda g, s=scale: s * g, grads), state, params)
          params = optax.apply_updates(params, updates)
        finals.append(np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(params)]))
      assert (not np.allclose(*finals)) == (name in readers), (key, name)
