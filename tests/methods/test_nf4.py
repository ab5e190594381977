"""NF4 storage of frozen kernels: code book, error bounds, exact values, padding, packing, jit, byte counts."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finetune.errors import FinetuneError
from finetune.methods import nf4

BITSANDBYTES_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
HALF_GAP = float(np.max(np.diff(nf4.NF4_CODE_BOOK))) / 2  # worst-case NF4 rounding, as a fraction of absmax


def _kernel(shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _error_bound(w: np.ndarray, q: dict, block_size: int) -> np.ndarray:
  """Per-element bound on |w - dequantize(q)|, shape of w.

  NF4 rounding moves w/absmax by at most half the largest code-book gap. Double quantisation changes absmax by
  at most half an int8 step of its group (scale / 254), and since |code-book value| <= 1 each element by at most
  that much too: |w - c a'| <= |w - c a| + |c| |a - a'|."""
  *lead, out = w.shape
  padded = -(-out // block_size) * block_size
  blocks = np.pad(w, [(0, 0)] * len(lead) + [(0, padded - out)]).reshape(*lead, padded // block_size, block_size)
  absmax = np.abs(blocks).max(axis=-1)  # (*lead, P/B)
  absmax_err = np.zeros_like(absmax)
  if "absmax_scale" in q:
    scale = np.asarray(q["absmax_scale"])
    group = -(-absmax.size // scale.size)  # the balanced grouping documented in nf4's docstring
    absmax_err = (scale[np.arange(absmax.size) // group] / 254).reshape(absmax.shape) * (1 + 1e-5) + 1e-7
  bound = absmax * HALF_GAP * (1 + 1e-5) + 1e-7 + absmax_err  # (*lead, P/B), small float32 slack
  return np.repeat(bound, block_size, axis=-1)[..., :out]  # (*lead, P/B) -> (*lead, out)


def test_code_book_is_bitsandbytes_nf4():
  book = nf4.NF4_CODE_BOOK
  assert book.dtype == np.float32 and book.shape == (16,)
  assert np.all(np.diff(book) > 0)
  assert book[0] == -1.0 and book[-1] == 1.0 and 0.0 in book
  np.testing.assert_array_equal(book, np.asarray(BITSANDBYTES_NF4, np.float32))


@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_error_is_bounded_per_element(double_quant):
  w = _kernel((256, 192))
  q = nf4.quantize(jnp.asarray(w), block_size=64, double_quant=double_quant, scale_block_size=256)
  deq = np.asarray(nf4.dequantize(q, w.shape))
  assert deq.shape == w.shape and deq.dtype == np.float32
  err = np.abs(w - deq)
  bound = _error_bound(w, q, 64)
  assert np.all(err <= bound), f"{np.sum(err > bound)} elements exceed the bound; worst {np.max(err - bound)}"
  # Sanity at report level: NF4 on Gaussian weights averages ~0.073 sigma; a broken code book or packing is ~1.
  assert err.mean() < 0.1 * w.std()


def test_double_quantised_absmax_is_within_half_an_int8_step():
  w = _kernel((64, 640), seed=1)  # 640 absmax values -> groups of 214/214/212 with scale_block_size=256
  q = nf4.quantize(jnp.asarray(w), block_size=64, double_quant=True, scale_block_size=256)
  assert q["absmax_codes"].dtype == jnp.int8 and q["absmax_codes"].shape == (64, 10)
  assert q["absmax_scale"].shape == (3,) and q["absmax_offset"].shape == ()
  true = np.abs(w.reshape(64, 10, 64)).max(axis=-1)
  got = np.asarray(nf4.dequantize_absmax(q))
  scale = np.asarray(q["absmax_scale"])[np.arange(640) // 214].reshape(64, 10)
  assert np.all(np.abs(true - got) <= scale / 254 * (1 + 1e-5) + 1e-7)


def test_values_on_the_code_book_round_trip_exactly():
  absmax = np.float32(0.37)
  codes = np.random.default_rng(2).permutation(np.tile(np.arange(16), 4))  # 64 codes, each value present
  block = nf4.NF4_CODE_BOOK[codes] * absmax  # contains +-absmax, so absmax is recovered exactly
  # NF4 is asymmetric (-0.696 is a code, +0.696 is not), so the second row rescales rather than negates.
  other = nf4.NF4_CODE_BOOK[codes[::-1]] * np.float32(2.5)
  w = np.stack([block, other, np.zeros_like(block)])  # (3, 64); the zero block must not give NaN
  q = nf4.quantize(jnp.asarray(w), block_size=64, double_quant=False)
  np.testing.assert_array_equal(np.asarray(nf4.dequantize(q, w.shape)), w)


def test_padding_is_sliced_off():
  w = _kernel((8, 100), seed=3)
  q = nf4.quantize(jnp.asarray(w), block_size=64)
  assert q["codes"].shape == (8, 64) and q["absmax_codes"].shape == (8, 2)
  deq = np.asarray(nf4.dequantize(q, (8, 100)))
  assert deq.shape == (8, 100)
  assert np.all(np.abs(w - deq) <= _error_bound(w, q, 64))


def test_leading_axes_are_kept():
  w = _kernel((3, 5, 100), seed=4)
  q = nf4.quantize(jnp.asarray(w), block_size=32, double_quant=False)
  assert q["codes"].shape == (3, 5, 64) and q["absmax"].shape == (3, 5, 4)
  deq = np.asarray(nf4.dequantize(q, w.shape, dtype=jnp.bfloat16).astype(jnp.float32))
  assert deq.shape == w.shape
  bound = _error_bound(w, q, 32)
  assert np.all(np.abs(w - deq) <= bound + (np.abs(w) + bound) * 2 ** -8)  # + bfloat16 rounding of the result


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_under_jit_equals_eager(double_quant):
  w = _kernel((256, 192), seed=5)
  q = nf4.quantize(jnp.asarray(w), double_quant=double_quant)
  eager = np.asarray(nf4.dequantize(q, w.shape))
  jitted = np.asarray(jax.jit(nf4.dequantize, static_argnums=(1, 2))(q, w.shape, jnp.float32))
  if double_quant:
    # XLA fuses absmax = code * scale / 127 + offset into a fused multiply-add, which rounds once instead of
    # twice: a few absmax values (so their whole blocks) move by one float32 ulp. Nothing larger may differ.
    np.testing.assert_allclose(jitted, eager, rtol=3e-7, atol=0)
  else:
    np.testing.assert_array_equal(jitted, eager)
  # And quantize itself traces: a jitted quantize-dequantize round trip gives the same kernel, within the bound.
  through = np.asarray(jax.jit(lambda a: nf4.dequantize(nf4.quantize(a, double_quant=double_quant),
                                                        (256, 192)))(jnp.asarray(w)))
  np.testing.assert_allclose(through, eager, rtol=3e-7, atol=0)
  assert np.all(np.abs(w - through) <= _error_bound(w, q, 64))


def test_codes_are_packed_two_per_byte():
  w = jnp.asarray(_kernel((16, 128), seed=6))
  q = nf4.quantize(w, block_size=64, double_quant=False)
  assert q["codes"].dtype == jnp.uint8 and q["codes"].shape == (16, 64)
  # Even element in the high nibble (bitsandbytes order): unpacking by hand recovers the codes' values.
  packed = np.asarray(q["codes"]).astype(np.int64)
  codes = np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(16, 2, 64)
  by_hand = nf4.NF4_CODE_BOOK[codes] * np.asarray(q["absmax"])[..., None]
  np.testing.assert_array_equal(by_hand.reshape(16, 128), np.asarray(nf4.dequantize(q, (16, 128))))


def test_abstract_layout_and_byte_counts_match_real_arrays():
  w = jnp.asarray(_kernel((96, 200), seed=7))
  for double_quant in (False, True):
    q = nf4.quantize(w, block_size=64, double_quant=double_quant, scale_block_size=128)
    abstract = nf4.abstract_quantized((96, 200), 64, double_quant, 128)
    assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {k: (v.shape, v.dtype) for k, v in q.items()}
    assert nf4.stored_bytes(q) == sum(v.nbytes for v in q.values()) == nf4.stored_bytes(abstract)
    report = nf4.memory_report([(96, 200)], 64, double_quant, 128)
    assert report == {"nf4": nf4.stored_bytes(q), "float32": 96 * 200 * 4, "bfloat16": 96 * 200 * 2}


def test_a_4096_square_kernel_costs_about_half_a_byte_per_parameter():
  report = nf4.memory_report([(4096, 4096)])  # eval_shape: nothing allocated
  assert 0.125 * report["float32"] < report["nf4"] < 0.14 * report["float32"]
  # Exactly: 0.5 B codes + 1/64 B int8 absmax per parameter, one float32 scale per 256 absmax, one offset.
  assert report["nf4"] == 4096 * 4096 // 2 + 4096 * 64 + 4 * math.ceil(4096 * 64 / 256) + 4
  assert report["bfloat16"] == 2 * 4096 * 4096


@pytest.mark.parametrize("block_size", [0, -64, 63, 64.0, True])
def test_bad_block_size_raises(block_size):
  with pytest.raises(FinetuneError, match="block_size"):
    nf4.quantize(jnp.ones((4, 64)), block_size=block_size)
  with pytest.raises(FinetuneError, match="block_size"):
    nf4.memory_report([(4, 64)], block_size=block_size)


def test_wrong_shape_for_dequantize_raises():
  q = nf4.quantize(jnp.ones((4, 100)), block_size=64)
  with pytest.raises(FinetuneError, match="shape"):
    nf4.dequantize(q, (4, 200))
